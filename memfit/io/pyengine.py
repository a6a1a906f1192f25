"""Pure-Python I/O engine: the same contract and the same piece plan as csrc/aio, with os.preadv /
os.pwritev on a thread pool. Used when MEMFIT_NO_EXT=1 or the extension is missing, and as the
executable model of the C++ code in the tests.

Like the native engine, it starts all queue_depth workers when it is created, so a submit never
has to start a thread (a thread that fails to start after part of a request was queued would lose
the rest), and a worker reports every failure as an errno on its piece, never as an exception.
"""

import errno
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from memfit.io.buffers import memory_at

ALIGNMENT = 4096


class PieceSpec:
    __slots__ = ("fd", "fallback_fd", "address", "file_offset", "num_bytes", "direct")

    def __init__(self, fd, fallback_fd, address, file_offset, num_bytes, direct):
        self.fd, self.fallback_fd, self.address = fd, fallback_fd, address
        self.file_offset, self.num_bytes, self.direct = file_offset, num_bytes, direct


def plan_pieces(direct_fd, buffered_fd, address, num_bytes, file_offset, block_size):
    """Aligned middle on the direct fd in block_size pieces; unaligned head and tail buffered."""
    end = file_offset + num_bytes
    mid_begin = -(-file_offset // ALIGNMENT) * ALIGNMENT
    mid_end = end // ALIGNMENT * ALIGNMENT
    if direct_fd < 0 or mid_end <= mid_begin:
        ranges = [(file_offset, end, False)]
    else:
        ranges = [(file_offset, mid_begin, False), (mid_begin, mid_end, True), (mid_end, end, False)]
    pieces = []
    for begin, stop, direct in ranges:
        for offset in range(begin, stop, block_size):
            pieces.append(
                PieceSpec(
                    direct_fd if direct else buffered_fd,
                    buffered_fd,
                    address + (offset - file_offset),
                    offset,
                    min(block_size, stop - offset),
                    direct,
                )
            )
    return pieces


class PyRequest:
    """futures[i] is piece i's future, or NOT_QUEUED for a piece that never ran (it fails ENOMEM)."""

    NOT_QUEUED = None

    def __init__(self, num_pieces, num_bytes, is_read, allow_short):
        self.futures = [self.NOT_QUEUED] * num_pieces  # filled in place: queueing allocates nothing here
        self._num_bytes = num_bytes
        self._is_read, self._allow_short = is_read, allow_short

    def done(self) -> bool:
        return all(future is self.NOT_QUEUED or future.done() for future in self.futures)

    def wait(self) -> int:
        """Bytes transferred, or -errno, like the native Request. Safe to call from several threads."""
        total, first_error = 0, 0
        for future in self.futures:
            num_done, error = (0, errno.ENOMEM) if future is self.NOT_QUEUED else future.result()
            total += num_done
            first_error = first_error or error
        if first_error:
            return -first_error
        if total < self._num_bytes and not (self._is_read and self._allow_short):
            return -errno.ENODATA
        return total


class PyEngine:
    backend = "python"

    def __init__(self, block_size: int, queue_depth: int):
        self.block_size, self.queue_depth = block_size, queue_depth
        self._pool = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="memfit-io")
        self._local = threading.local()
        self._start_workers()

    def _start_workers(self) -> None:
        """Starts every worker now. The pool starts a thread for each task submitted while all of
        its threads are busy, so queue_depth tasks that wait for each other start them all."""
        all_started = threading.Barrier(self.queue_depth + 1)
        try:
            for _ in range(self.queue_depth):
                self._pool.submit(all_started.wait)
            all_started.wait()
        except RuntimeError as error:  # "can't start new thread"
            all_started.abort()
            self._pool.shutdown(wait=True)
            raise OSError(errno.EAGAIN, f"cannot start {self.queue_depth} I/O worker threads ({error})") from None

    def submit(self, direct_fd, buffered_fd, address, num_bytes, file_offset, is_read, allow_short):
        # Everything that can fail for lack of memory happens before the first piece is queued; from
        # then on a failure only ends the queueing, and the pieces left out fail with ENOMEM.
        pieces = plan_pieces(direct_fd, buffered_fd, address, num_bytes, file_offset, self.block_size)
        request = PyRequest(len(pieces), num_bytes, is_read, allow_short)
        for index, piece in enumerate(pieces):
            try:
                request.futures[index] = self._pool.submit(self._run_piece, piece, is_read)
            except (RuntimeError, MemoryError):  # no memory for a lock or a work item, or shutting down
                break
        return request

    def _bounce(self) -> memoryview | None:
        """This worker's page-aligned bounce buffer, or None when there is no memory for one."""
        if getattr(self._local, "bounce", None) is None:
            try:
                self._local.bounce = memoryview(mmap.mmap(-1, self.block_size))
            except (OSError, MemoryError):
                return None
        return self._local.bounce

    def _run_piece(self, piece: PieceSpec, is_read: bool) -> tuple[int, int]:
        """(bytes done, errno or 0); never raises, like a native backend thread."""
        try:
            return self._transfer_piece(piece, is_read)
        except MemoryError:
            return 0, errno.ENOMEM

    def _transfer_piece(self, piece: PieceSpec, is_read: bool) -> tuple[int, int]:
        user = memory_at(piece.address, piece.num_bytes)
        num_done, fd, direct = 0, piece.fd, piece.direct
        while num_done < piece.num_bytes:
            remaining = piece.num_bytes - num_done
            bounce = direct and (piece.address + num_done) % ALIGNMENT != 0
            if bounce and self._bounce() is None:
                return num_done, errno.ENOMEM
            target = self._bounce()[:remaining] if bounce else user[num_done:]
            if bounce and not is_read:
                target[:] = user[num_done:]
            try:
                if is_read:
                    result = os.preadv(fd, [target], piece.file_offset + num_done)
                else:
                    result = os.pwritev(fd, [target], piece.file_offset + num_done)
            except InterruptedError:
                continue
            except OSError as error:
                return num_done, error.errno or errno.EIO
            if result == 0:
                return num_done, 0 if is_read else errno.EIO
            if bounce and is_read:
                user[num_done : num_done + result] = target[:result]
            num_done += result
            if direct and ((piece.file_offset + num_done) % ALIGNMENT or (piece.num_bytes - num_done) % ALIGNMENT):
                fd, direct = piece.fallback_fd, False  # short direct transfer: finish buffered
        return num_done, 0
