"""AsyncFile: asynchronous positional reads and writes of whole buffers, O_DIRECT where the file
system allows it. Each file keeps two descriptors: an O_DIRECT one for the aligned middle of a
transfer and a buffered one for unaligned heads and tails, so no byte is ever dropped."""

import collections
import errno
import os
import threading
import warnings

from memfit.io.buffers import buffer_span
from memfit.io.engine import DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, get_engine
from memfit.units import parse_size

_MODES = {"r": os.O_RDONLY, "w": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "rw": os.O_RDWR | os.O_CREAT}
_warned_paths: set[str] = set()
_warned_lock = threading.Lock()


def _warn_buffered(path: str, reason: str) -> None:
    with _warned_lock:
        if path in _warned_paths:
            return
        _warned_paths.add(path)
    warnings.warn(f"{path}: {reason}; using buffered I/O", RuntimeWarning, stacklevel=4)


class Request:
    """One submitted read or write. wait() returns the bytes transferred or raises OSError."""

    def __init__(self, native_request, buffer, path: str, what: str):
        self._native = native_request
        self._buffer = buffer  # keeps the memory alive until the transfer completes
        self._path, self._what = path, what
        self._result = None

    def done(self) -> bool:
        return self._result is not None or self._native.done()

    def wait(self) -> int:
        if self._result is None:
            self._result = self._native.wait()
            self._buffer = None
        if self._result < 0:
            code = -self._result
            message = os.strerror(code)
            if code == errno.ENODATA:
                message = f"short {self._what}: end of file reached"
            raise OSError(code, message, self._path)
        return self._result


class AsyncFile:
    """A file for asynchronous whole-buffer I/O.

    mode is "r", "w" (create or truncate) or "rw" (create if missing). size= preallocates the file
    (fallocate), which keeps block allocation out of the I/O path.
    """

    def __init__(
        self,
        path,
        mode: str = "r",
        *,
        direct: bool = True,
        block_size=DEFAULT_BLOCK_SIZE,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        backend: str = "auto",
        size=None,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode: expected 'r', 'w' or 'rw', got {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        try:
            self._engine = get_engine(backend, block_size, queue_depth)
        except OSError as error:  # no thread or no memory to start a new engine
            raise OSError(error.errno, f"cannot start the I/O engine: {error.strerror}", self.path) from None
        self._outstanding: collections.deque[Request] = collections.deque()
        self._buffered_fd = os.open(self.path, _MODES[mode] | os.O_CLOEXEC, 0o644)
        self._direct_fd = -1
        try:
            if direct:
                self._direct_fd = self._open_direct()
            if size is not None:
                self._preallocate(parse_size(size))
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

    def pwrite(self, buffer, offset: int) -> Request:
        if self.mode == "r":
            raise ValueError(f"{self.path}: opened read-only (mode 'r')")
        address, num_bytes = buffer_span(buffer, writable=False)
        return self._submit(buffer, address, num_bytes, offset, is_read=False, allow_short=False)

    def pread(self, into, offset: int, *, allow_short: bool = False) -> Request:
        """Reads len(into) bytes at offset. A read that hits end of file first raises OSError
        (ENODATA) on wait() unless allow_short, when wait() returns the bytes actually read."""
        address, num_bytes = buffer_span(into, writable=True)
        return self._submit(into, address, num_bytes, offset, is_read=True, allow_short=allow_short)

    def _submit(self, buffer, address, num_bytes, offset, *, is_read, allow_short) -> Request:
        if self._buffered_fd < 0:
            raise ValueError(f"{self.path}: I/O on a closed file")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset: must be a non-negative integer, got {offset!r}")
        try:
            native_request = self._engine.submit(
                self._direct_fd, self._buffered_fd, address, num_bytes, offset, is_read, allow_short
            )
        except MemoryError:  # raised before any piece was queued
            raise OSError(errno.ENOMEM, "no memory to queue the request", self.path) from None
        request = Request(native_request, buffer, self.path, "read" if is_read else "write")
        while self._outstanding and self._outstanding[0].done():  # drop finished ones, oldest first: O(1) amortized
            self._outstanding.popleft()
        self._outstanding.append(request)
        return request

    def fsync(self) -> None:
        """Waits for outstanding writes, then makes the file's data durable."""
        self._drain()
        os.fsync(self._buffered_fd)

    def _drain(self) -> None:
        for request in self._outstanding:
            try:
                request.wait()
            except OSError:
                pass  # reported again to whoever waits on that request
        self._outstanding.clear()

    def close(self) -> None:
        """Waits for every outstanding request, then closes. Safe to call twice."""
        self._drain()
        for fd in (self._direct_fd, self._buffered_fd):
            if fd >= 0:
                os.close(fd)
        self._direct_fd = self._buffered_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        if getattr(self, "_buffered_fd", -1) >= 0:
            self.close()
