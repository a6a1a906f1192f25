"""SwapFile: one preallocated file per rank holding named tensors in 4 KiB-aligned slots, with an
in-memory offset table. The descriptor stays open; there is never a file per tensor."""

import errno
import os

from memfit.io.buffers import buffer_span
from memfit.io.engine import DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH
from memfit.io.extents import ExtentAllocator
from memfit.io.file import AsyncFile, Request
from memfit.units import format_bytes, parse_size


class SwapFullError(OSError):
    """The swap file has no free slot large enough; raised before any byte is written."""


class SwapFile:
    def __init__(
        self,
        path,
        capacity_bytes,
        *,
        block_size=DEFAULT_BLOCK_SIZE,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        backend: str = "auto",
        direct: bool = True,
    ):
        capacity = parse_size(capacity_bytes)
        self._extents = ExtentAllocator(capacity)
        self.capacity_bytes = self._extents.capacity_bytes
        self.path = os.fspath(path)
        self._file = AsyncFile(
            self.path,
            "w",
            size=self.capacity_bytes,
            direct=direct,
            block_size=block_size,
            queue_depth=queue_depth,
            backend=backend,
        )
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (offset, nbytes)

    @property
    def file(self) -> AsyncFile:
        return self._file

    def put(self, name: str, tensor) -> Request:
        """Writes tensor into the slot called name, allocating it on first use."""
        num_bytes = buffer_span(tensor, writable=False, what="tensor").num_bytes
        slot = self._slots.get(name)
        if slot is None:
            offset = self._extents.allocate(num_bytes)
            if offset is None:
                raise SwapFullError(
                    errno.ENOSPC,
                    f"swap file full: slot {name!r} needs {format_bytes(num_bytes)}, "
                    f"{format_bytes(self._extents.free_bytes)} free of {format_bytes(self.capacity_bytes)}",
                    self.path,
                )
            slot = self._slots[name] = (offset, num_bytes)
        elif slot[1] != num_bytes:
            raise ValueError(f"slot {name!r} holds {slot[1]} bytes, got a tensor of {num_bytes}; remove() it first")
        return self._file.pwrite(tensor, slot[0])

    def get(self, name: str, into) -> Request:
        """Reads the slot called name into `into`, which must have the slot's exact size."""
        if name not in self._slots:
            raise KeyError(f"no slot named {name!r} in {self.path}")
        offset, num_bytes = self._slots[name]
        into_bytes = buffer_span(into, writable=True, what="into").num_bytes
        if into_bytes != num_bytes:
            raise ValueError(f"slot {name!r} holds {num_bytes} bytes, destination has {into_bytes}")
        return self._file.pread(into, offset)

    def remove(self, name: str) -> None:
        offset, num_bytes = self._slots.pop(name)
        self._extents.release(offset, num_bytes)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def names(self) -> list[str]:
        return list(self._slots)

    def table(self) -> dict[str, tuple[int, int]]:
        """name -> (file offset, nbytes)."""
        return dict(self._slots)

    @property
    def bytes_in_use(self) -> int:
        return sum(num_bytes for _, num_bytes in self._slots.values())

    @property
    def free_bytes(self) -> int:
        return self._extents.free_bytes

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
