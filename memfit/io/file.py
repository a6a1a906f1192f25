"""AsyncFile: asynchronous positional reads and writes of whole buffers, O_DIRECT where the file
system allows it. Each file keeps two descriptors: an O_DIRECT one for the aligned middle of a
transfer and a buffered one for unaligned heads and tails, so no byte is ever dropped.

Thread-safety: an AsyncFile may be shared by any number of threads (see the class docstring for
how close() and fsync() order with submissions). Lifetimes: a request holds its buffer, exported,
until it finishes; the file holds every unfinished request, and close() waits for all of them. A
child of fork() may not use a file its parent opened.
"""

import collections
import errno
import operator
import os
import threading
import warnings

from memfit.io.buffers import Span, buffer_span
from memfit.io.engine import get_engine, resolve_geometry
from memfit.units import parse_size

MAX_FILE_BYTES = 2**63 - 1  # the largest offset off_t can hold
_MODES = {"r": os.O_RDONLY, "w": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "rw": os.O_RDWR | os.O_CREAT}
_warned_paths: set[str] = set()
_warned_lock = threading.Lock()


def _warn_buffered(path: str, reason: str) -> None:
    with _warned_lock:
        if path in _warned_paths:
            return
        _warned_paths.add(path)
    warnings.warn(f"{path}: {reason}; using buffered I/O", RuntimeWarning, stacklevel=4)


def check_offset(offset, num_bytes: int) -> int:
    """offset as an int, if offset + num_bytes fits in a file; ValueError naming offset if not."""
    try:
        if isinstance(offset, bool):
            raise TypeError
        offset = operator.index(offset)
    except TypeError:
        raise ValueError(f"offset: must be a non-negative integer, got {offset!r}") from None
    if offset < 0:
        raise ValueError(f"offset: must be a non-negative integer, got {offset}")
    if offset + num_bytes > MAX_FILE_BYTES:
        raise ValueError(f"offset: {offset} + {num_bytes} bytes ends past the largest file offset, 2**63 - 1")
    return offset


class Request:
    """One submitted read or write. wait() returns the bytes transferred or raises OSError; any
    thread may call it, any number of times. A request dropped unfinished keeps its buffer alive:
    the file holds it until it is done."""

    def __init__(self, native_request, keepalive, path: str, is_read: bool, owner_pid: int):
        self._native = native_request
        self._keepalive = keepalive  # the memory must outlive the transfer
        self._path, self.is_read, self._owner_pid = path, is_read, owner_pid
        self._result: int | None = None
        self._reported = False  # whether wait(), fsync() or close() has raised this request's error

    def done(self) -> bool:
        return self._result is not None or self._native.done()

    def wait(self) -> int:
        result = self._finish()
        if result < 0:
            self._reported = True
            raise self._error(result)
        return result

    def _finish(self) -> int:
        """Blocks until the transfer is over; returns bytes or -errno without raising."""
        if self._result is None:
            if os.getpid() != self._owner_pid and not self._native.done():
                raise ValueError(
                    f"{self._path}: a request of process {self._owner_pid} cannot finish in a forked child"
                )
            self._result = self._native.wait()
            self._keepalive = None
        return self._result

    def _error(self, result: int) -> OSError:
        code = -result
        message = os.strerror(code)
        if code == errno.ENODATA:
            message = f"short {'read' if self.is_read else 'write'}: end of file reached"
        return OSError(code, message, self._path)

    def _unreported_failure(self) -> bool:
        return self._finish() < 0 and not self._reported

    def __del__(self):
        # Reached with the request unfinished only when its file is gone too (interpreter shutdown) or
        # when submitting it failed half way for lack of memory.
        native = getattr(self, "_native", None)
        if native is not None and self._keepalive is not None and os.getpid() == self._owner_pid:
            native.wait()


class AsyncFile:
    """A file for asynchronous whole-buffer I/O.

    mode is "r", "w" (create or truncate) or "rw" (create if missing). size= preallocates the file
    (fallocate), which keeps block allocation out of the I/O path.

    Thread-safety: every method may be called from any thread, concurrently. pread/pwrite submit
    and return at once; close() refuses new requests, waits for every request already accepted and
    only then closes the descriptors, so a submit racing with close() either is accepted and
    completes or raises ValueError, never half of each. Requests in flight together complete in
    any order, piece by piece: overlapping writes in flight at the same time leave a mix of both.

    No failure is lost: a write that fails raises OSError(errno, path) from its wait(); if nobody
    has seen that error when fsync() or close() runs, they raise it (once), so fire-and-forget
    writes followed by fsync() or close() are safe.
    """

    def __init__(
        self,
        path,
        mode: str = "r",
        *,
        direct: bool = True,
        block_size=None,
        queue_depth: int | None = None,
        backend: str = "auto",
        size=None,
    ):
        self._lock = threading.Lock()
        self._buffered_fd = self._direct_fd = -1
        self._closing = False
        self._owner_pid = os.getpid()  # a forked child has a copy of this object but not its engine
        self._outstanding: collections.deque[Request] = collections.deque()
        self._failed_writes: list[Request] = []  # finished, failed, error not yet raised anywhere
        self.bytes_read = self.bytes_written = 0  # submitted since the file was opened
        if mode not in _MODES:
            raise ValueError(f"mode: expected 'r', 'w' or 'rw', got {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self.block_size, self.queue_depth = resolve_geometry(block_size, queue_depth)  # None: the process default
        try:
            self._engine = get_engine(backend, self.block_size, self.queue_depth)
        except OSError as error:  # no thread or no memory to start a new engine
            raise OSError(error.errno, f"cannot start the I/O engine: {error.strerror}", self.path) from None
        self._buffered_fd = os.open(self.path, _MODES[mode] | os.O_CLOEXEC, 0o644)
        try:
            if direct:
                self._direct_fd = self._open_direct()
            if size is not None:
                self._preallocate(self._check_size(size))
        except BaseException:
            self.close()
            raise

    def _open_direct(self) -> int:
        flags = (_MODES[self.mode] & ~(os.O_CREAT | os.O_TRUNC)) | os.O_DIRECT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            _warn_buffered(self.path, "the file system refuses O_DIRECT")
            return -1

    def _check_size(self, size) -> int:
        num_bytes = parse_size(size, "size")
        if num_bytes > MAX_FILE_BYTES:
            raise ValueError(f"size: {num_bytes} is larger than any file can be (2**63 - 1 bytes)")
        if self.mode == "r" and num_bytes:
            raise ValueError("size: cannot preallocate a file opened read-only (mode 'r')")
        return num_bytes

    def _preallocate(self, num_bytes: int) -> None:
        if num_bytes == 0:
            return
        try:
            os.posix_fallocate(self._buffered_fd, 0, num_bytes)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV, errno.ESPIPE):
                raise OSError(error.errno, os.strerror(error.errno), self.path) from None
            os.ftruncate(self._buffered_fd, num_bytes)

    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def direct(self) -> bool:
        """Whether aligned transfers bypass the page cache."""
        return self._direct_fd >= 0

    @property
    def closed(self) -> bool:
        return self._closing

    def pwrite(self, buffer, offset: int) -> Request:
        """Writes all of buffer at offset. buffer (a CPU tensor or any buffer-protocol object) must
        not be changed until the request is done."""
        if self.mode == "r":
            raise ValueError(f"{self.path}: opened read-only (mode 'r')")
        return self._submit(buffer, "buffer", offset, is_read=False)

    def pread(self, into, offset: int, *, allow_short: bool = False) -> Request:
        """Reads len(into) bytes at offset. A read that hits end of file first raises OSError
        (ENODATA) on wait() unless allow_short, when wait() returns the bytes actually read."""
        return self._submit(into, "into", offset, is_read=True, allow_short=allow_short)

    def _submit(self, buffer, what: str, offset, *, is_read: bool, allow_short: bool = False) -> Request:
        try:
            span = buffer_span(buffer, writable=is_read, what=what)
        except MemoryError:
            raise OSError(errno.ENOMEM, "no memory to queue the request", self.path) from None
        return self._submit_span(span, offset, is_read=is_read, allow_short=allow_short)

    def _submit_span(self, span: Span, offset, *, is_read: bool, allow_short: bool = False) -> Request:
        """Submits a transfer of span; the one way requests are made (SwapFile uses it too)."""
        offset = check_offset(offset, span.num_bytes)
        try:
            # The lock spans the native submit, so close() either sees this request or refuses it.
            with self._lock:
                self._check_open()
                # Made first, so that the buffer is held from the moment a piece is queued: if
                # anything below fails for lack of memory, the request's __del__ waits for its pieces.
                request = Request(None, span.owner, self.path, is_read, self._owner_pid)
                request._native = self._engine.submit(
                    self._direct_fd, self._buffered_fd, span.address, span.num_bytes, offset, is_read, allow_short
                )
                while self._outstanding and self._outstanding[0].done():  # oldest first: O(1) amortized
                    finished = self._outstanding.popleft()
                    if not finished.is_read and finished._unreported_failure():
                        self._failed_writes.append(finished)
                self._outstanding.append(request)
                if is_read:
                    self.bytes_read += span.num_bytes
                else:
                    self.bytes_written += span.num_bytes
        except MemoryError:
            raise OSError(errno.ENOMEM, "no memory to queue the request", self.path) from None
        return request

    def _check_open(self) -> None:
        if self._closing:
            raise ValueError(f"{self.path}: I/O on a closed file")
        if os.getpid() != self._owner_pid:
            raise ValueError(
                f"{self.path}: opened by process {self._owner_pid}; a forked child must open its own AsyncFile"
            )

    def fsync(self) -> None:
        """Waits for every request submitted before the call, then makes the file's data durable.
        Raises OSError if a write failed and its error has not been raised yet."""
        with self._lock:
            self._check_open()
            pending = list(self._outstanding)
            fd = os.dup(self._buffered_fd)  # close() from another thread cannot pull it away
        try:
            for request in pending:
                request._finish()
            try:
                os.fsync(fd)
                sync_error = None
            except OSError as error:
                sync_error = OSError(error.errno, f"fsync: {error.strerror}", self.path)
        finally:
            os.close(fd)
        self._raise_failed_writes(pending)
        if sync_error is not None:
            raise sync_error

    def close(self) -> None:
        """Refuses new requests, waits for every request accepted so far, then closes. Safe to call
        twice and from several threads; raises OSError if a write failed and its error has not
        been raised yet (the file is closed all the same)."""
        with self._lock:
            self._closing = True
            pending = list(self._outstanding)
        if os.getpid() != self._owner_pid:
            self._close_descriptors()  # a forked child's copies; the requests belong to the parent
            return
        for request in pending:
            request._finish()
        self._close_descriptors()
        self._raise_failed_writes(pending)

    def _close_descriptors(self) -> None:
        with self._lock:
            self._outstanding.clear()
            fds = (self._direct_fd, self._buffered_fd)
            self._direct_fd = self._buffered_fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _raise_failed_writes(self, finished: list[Request]) -> None:
        with self._lock:
            failed = [request for request in self._failed_writes + finished if not request.is_read]
            failed = [request for request in failed if request._unreported_failure()]
            self._failed_writes.clear()
            for request in failed:
                request._reported = True
        if failed:
            first = failed[0]._error(failed[0]._finish())
            num_failed = len(failed)
            raise OSError(
                first.errno,
                f"{num_failed} write{'s' if num_failed != 1 else ''} failed (first: {first.strerror})",
                self.path,
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        if getattr(self, "_buffered_fd", -1) < 0:
            return
        try:
            self.close()
        except OSError as error:
            warnings.warn(
                f"{self.path}: closed by garbage collection without close(); {error.strerror}",
                RuntimeWarning,
                stacklevel=2,
            )
