"""SwapFile: one preallocated scratch file per rank holding named tensors in 4 KiB-aligned slots,
with an in-memory table. The descriptor stays open; there is never a file per tensor.

Slots are typed: a slot records the dtype and shape of its first put, and a get into a buffer of
another dtype or shape (even of the same size) is refused. Operations on one slot take effect in
call order: put, get and remove first wait for the slot's previous request, so a get right after a
put reads what was put and a removed slot's space is reused only after its last write landed. A
put that fails leaves its slot unreadable (get raises OSError) until a later put succeeds.

Lifetime: the file is scratch space. It is removed when the SwapFile is closed, garbage collected,
or when the process exits normally, unless keep=True. Creating a SwapFile truncates whatever is at
the path, so a file left by a killed run is never read back as state, and an advisory lock makes a
second SwapFile on the same path (in any process) fail with EBUSY instead of sharing the file.

Thread-safety: every method may be called from any thread.
"""

import errno
import fcntl
import math
import os
import threading
import weakref
from typing import NamedTuple

import torch

from memfit.io.buffers import buffer_span
from memfit.io.extents import ExtentAllocator, align_up
from memfit.io.file import AsyncFile, Request
from memfit.units import format_bytes, parse_size


class SwapFullError(OSError):
    """The swap file has no free slot large enough; raised before any byte is written."""


class Slot(NamedTuple):
    offset: int
    num_bytes: int
    dtype: torch.dtype | str
    shape: tuple[int, ...]


class _SlotState:
    __slots__ = ("slot", "last_request", "last_put")

    def __init__(self, slot: Slot):
        self.slot = slot
        self.last_request: Request | None = None  # the newest request on the slot, put or get
        self.last_put: Request | None = None

    def settle(self) -> None:
        """Waits for the slot's newest request, whatever its outcome."""
        if self.last_request is not None:
            self.last_request._finish()


def _describe(dtype, shape) -> str:
    return f"{dtype} {tuple(shape)}"


def _release(file: AsyncFile, lock_fd: int, path: str, identity: tuple[int, int], keep: bool, owner_pid: int):
    """Closes the file and removes it. Runs once: from close(), at garbage collection, or at exit."""
    if os.getpid() != owner_pid:
        return  # a forked child exiting must leave its parent's swap file alone
    try:
        file.close()
    finally:
        try:
            if not keep:
                stat = os.stat(path)
                if (stat.st_dev, stat.st_ino) == identity:  # the path may have been replaced since
                    os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(lock_fd)  # after the unlink, so no other SwapFile can open the path in between


class SwapFile:
    def __init__(
        self,
        path,
        capacity_bytes,
        *,
        block_size=None,
        queue_depth: int | None = None,
        backend: str = "auto",
        direct: bool = True,
        keep: bool = False,
    ):
        capacity = align_up(parse_size(capacity_bytes, "capacity_bytes"))
        if capacity <= 0:
            raise ValueError(f"capacity_bytes: must be positive, got {capacity_bytes!r}")
        self._extents = ExtentAllocator(capacity)
        self.capacity_bytes = capacity
        self.path = os.fspath(path)
        self.keep = keep
        self._lock = threading.Lock()
        self._slots: dict[str, _SlotState] = {}
        lock_fd = self._lock_path()
        try:
            self._file = AsyncFile(
                self.path,
                "w",  # truncates: nothing a previous run left behind can be read back
                size=self.capacity_bytes,
                direct=direct,
                block_size=block_size,
                queue_depth=queue_depth,
                backend=backend,
            )
        except BaseException:
            if not keep and os.path.exists(self.path):
                os.unlink(self.path)
            os.close(lock_fd)
            raise
        stat = os.fstat(lock_fd)
        self._finalizer = weakref.finalize(
            self, _release, self._file, lock_fd, self.path, (stat.st_dev, stat.st_ino), keep, os.getpid()
        )

    def _lock_path(self) -> int:
        """Opens the path (creating it, readable by its owner only) and takes its advisory lock."""
        lock_fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise OSError(errno.EBUSY, "swap file is in use by another SwapFile", self.path) from None
        return lock_fd

    @property
    def file(self) -> AsyncFile:
        return self._file

    def put(self, name: str, tensor) -> Request:
        """Writes tensor into the slot called name, allocating it on first use."""
        span = buffer_span(tensor, writable=False, what="tensor")
        with self._lock:
            self._check_open()
            state = self._slots.get(name)
            is_new = state is None
            if is_new:
                offset = self._extents.allocate(span.num_bytes)
                if offset is None:
                    raise SwapFullError(
                        errno.ENOSPC,
                        f"swap file full: slot {name!r} needs {format_bytes(span.num_bytes)}, "
                        f"{format_bytes(self._extents.free_bytes)} free of {format_bytes(self.capacity_bytes)}",
                        self.path,
                    )
                state = self._slots[name] = _SlotState(Slot(offset, span.num_bytes, span.dtype, span.shape))
            slot = state.slot
            if slot.num_bytes != span.num_bytes:
                raise ValueError(
                    f"slot {name!r} holds {slot.num_bytes} bytes, got a tensor of {span.num_bytes}; remove() it first"
                )
            if (slot.dtype, slot.shape) != (span.dtype, span.shape):
                raise ValueError(
                    f"slot {name!r} holds {_describe(slot.dtype, slot.shape)}, "
                    f"got {_describe(span.dtype, span.shape)}; remove() it first"
                )
            state.settle()
            try:
                request = self._file._submit_span(span, slot.offset, is_read=False)
            except BaseException:
                if is_new:  # nothing was written: the slot never existed
                    del self._slots[name]
                    self._extents.release(slot.offset, slot.num_bytes)
                raise
            state.last_request = state.last_put = request
        return request

    def reserve(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Slot:
        """Allocates the slot called name without writing it, for a caller that transfers ranges
        of it through `file` itself (and orders those transfers itself); get() refuses the slot
        until a put() has written it."""
        num_bytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            self._check_open()
            if name in self._slots:
                raise ValueError(f"slot {name!r} exists already in {self.path}")
            offset = self._extents.allocate(num_bytes)
            if offset is None:
                raise SwapFullError(
                    errno.ENOSPC,
                    f"swap file full: slot {name!r} needs {format_bytes(num_bytes)}, "
                    f"{format_bytes(self._extents.free_bytes)} free of {format_bytes(self.capacity_bytes)}",
                    self.path,
                )
            slot = Slot(offset, num_bytes, dtype, tuple(shape))
            self._slots[name] = _SlotState(slot)
        return slot

    def get(self, name: str, into) -> Request:
        """Reads the slot called name into `into`, which must have the slot's dtype and shape."""
        span = buffer_span(into, writable=True, what="into")
        with self._lock:
            self._check_open()
            state = self._slots.get(name)
            if state is None:
                raise KeyError(f"no slot named {name!r} in {self.path}")
            slot = state.slot
            if span.num_bytes != slot.num_bytes:
                raise ValueError(f"slot {name!r} holds {slot.num_bytes} bytes, destination has {span.num_bytes}")
            if (slot.dtype, slot.shape) != (span.dtype, span.shape):
                raise ValueError(
                    f"slot {name!r} holds {_describe(slot.dtype, slot.shape)}, "
                    f"destination is {_describe(span.dtype, span.shape)}"
                )
            state.settle()
            if state.last_put is None:
                raise OSError(errno.ENODATA, f"slot {name!r} was reserved and never put", self.path)
            put_result = state.last_put._finish()
            if put_result < 0:
                raise OSError(
                    -put_result,
                    f"slot {name!r}: its last put failed ({os.strerror(-put_result)}); put it again",
                    self.path,
                )
            request = self._file._submit_span(span, slot.offset, is_read=True)
            state.last_request = request
        return request

    def remove(self, name: str) -> None:
        """Frees the slot; its space is reused only after its last request has finished."""
        with self._lock:
            state = self._slots.get(name)
            if state is None:
                raise KeyError(f"no slot named {name!r} in {self.path}")
            state.settle()
            del self._slots[name]
            self._extents.release(state.slot.offset, state.slot.num_bytes)

    def slot(self, name: str) -> Slot:
        """Where the slot called name lives and what it holds."""
        with self._lock:
            state = self._slots.get(name)
            if state is None:
                raise KeyError(f"no slot named {name!r} in {self.path}")
            return state.slot

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def names(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def table(self) -> dict[str, tuple[int, int]]:
        """name -> (file offset, nbytes)."""
        with self._lock:
            return {name: (state.slot.offset, state.slot.num_bytes) for name, state in self._slots.items()}

    @property
    def bytes_in_use(self) -> int:
        with self._lock:
            return sum(state.slot.num_bytes for state in self._slots.values())

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._extents.free_bytes

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError(f"{self.path}: swap file is closed")

    def close(self) -> None:
        """Waits for every request, closes, and removes the file unless keep=True. Safe to call
        twice. Raises OSError if a put failed and nobody has seen its error."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
