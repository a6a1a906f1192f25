"""HostArena: one anonymous mmap carved into exact-size, 4 KiB-aligned tensors.

torch's pinned allocator rounds every block up to a power of two (a 2.1 GiB request takes 4 GiB);
the arena reserves only the 4 KiB-rounded size, and is registered with CUDA once, as a whole,
when a GPU is present.

Lifetime: every tensor the arena hands out, and everything derived from one (views of views,
`.numpy()` arrays, `untyped_storage()`), holds an exported buffer of the mapping. close() refuses
with BufferError while any of them is alive, so no tensor can ever point at unmapped memory; an
arena dropped without close() is unmapped when its last tensor dies. free() only returns a block to
the allocator: a tensor kept after free() still pins the mapping, and its bytes may be handed out
again, exactly like memory after C's free().

Thread-safety: alloc, free and close may be called from any thread.
"""

import gc
import math
import mmap
import operator
import threading
import warnings
import weakref

import torch

from memfit.io.extents import ExtentAllocator, align_up
from memfit.units import format_bytes, parse_size


def _unregister_cuda(address: int, mapping: mmap.mmap) -> None:
    """Runs when the last tensor of a pinned arena dies; holding `mapping` keeps it mapped until
    CUDA has let go of the range."""
    torch.cuda.cudart().cudaHostUnregister(address)


class HostArena:
    def __init__(self, capacity_bytes, *, register_cuda: bool | None = None):
        capacity = align_up(parse_size(capacity_bytes, "capacity_bytes"))
        if capacity <= 0:
            raise ValueError(f"capacity_bytes: must be positive, got {capacity_bytes!r}")
        self.capacity_bytes = capacity
        try:
            self._mmap = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OverflowError:
            raise ValueError(f"capacity_bytes: {capacity_bytes!r} is larger than an address space") from None
        # Tensors are made from a memoryview, not the mmap itself: torch keeps the memoryview alive
        # with the storage, and while it lives the mmap cannot be closed. The weak reference tells
        # close() whether any tensor still exists.
        view = memoryview(self._mmap)
        self._view_ref = weakref.ref(view)
        self._base = torch.frombuffer(view, dtype=torch.uint8)
        self._address = self._base.data_ptr()
        self._lock = threading.RLock()
        self._extents = ExtentAllocator(capacity)
        self._blocks: dict[int, int] = {}  # data_ptr -> requested bytes
        self.bytes_in_use = 0
        self.peak_bytes = 0
        self.pinned = False
        if register_cuda is None:
            register_cuda = torch.cuda.is_available()
        if register_cuda:
            self._register_cuda()

    def _register_cuda(self) -> None:
        status = torch.cuda.cudart().cudaHostRegister(self._base.data_ptr(), self.capacity_bytes, 0)
        if int(status) != 0:
            warnings.warn(
                f"cudaHostRegister failed ({status}); host arena stays pageable", RuntimeWarning, stacklevel=3
            )
            return
        self.pinned = True
        self._unregister = weakref.finalize(self._view_ref(), _unregister_cuda, self._address, self._mmap)

    @property
    def address(self) -> int:
        return self._address

    def alloc(self, size, dtype: torch.dtype | None = None) -> torch.Tensor:
        """alloc(nbytes) gives a uint8 tensor of nbytes; alloc(shape, dtype) a tensor of that shape.
        Every block starts on a 4 KiB boundary and takes exactly its size, rounded up to 4 KiB."""
        if not isinstance(dtype, torch.dtype | None):
            raise ValueError(f"dtype: expected a torch.dtype, got {dtype!r}")
        if dtype is None:
            dtype, shape = torch.uint8, (parse_size(size, "size"),)
        else:
            dims = tuple(size) if isinstance(size, tuple | list | torch.Size) else (size,)
            try:
                shape = tuple(operator.index(dim) for dim in dims)
            except TypeError:
                raise ValueError(f"size: dimensions must be integers, got {size!r}") from None
        if any(dim < 0 for dim in shape):
            raise ValueError(f"size: dimensions must not be negative, got {shape}")
        num_bytes = math.prod(shape) * dtype.itemsize
        if num_bytes == 0:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            self._check_open()
            offset = self._extents.allocate(num_bytes)
            if offset is None:
                raise MemoryError(
                    f"host arena full: {format_bytes(num_bytes)} requested, "
                    f"{format_bytes(self._extents.free_bytes)} free of {format_bytes(self.capacity_bytes)} "
                    f"(largest free block {format_bytes(self._extents.largest_free_bytes)})"
                )
            tensor = self._base[offset : offset + num_bytes].view(dtype).view(shape)
            self._blocks[tensor.data_ptr()] = num_bytes
            self.bytes_in_use += num_bytes
            self.peak_bytes = max(self.peak_bytes, self.bytes_in_use)
        return tensor

    def free(self, tensor: torch.Tensor) -> None:
        """Returns tensor's block to the arena; the caller must not use tensor afterwards."""
        if tensor.numel() == 0:
            return
        with self._lock:
            num_bytes = self._blocks.pop(tensor.data_ptr(), None)
            if num_bytes is None:
                raise ValueError("tensor was not allocated from this arena (or was freed already)")
            self._extents.release(tensor.data_ptr() - self.address, num_bytes)
            self.bytes_in_use -= num_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes taken from the arena, each block rounded up to 4 KiB."""
        with self._lock:
            return sum(align_up(num_bytes) for num_bytes in self._blocks.values())

    def owns(self, tensor: torch.Tensor) -> bool:
        return self.address <= tensor.data_ptr() < self.address + self.capacity_bytes

    def _check_open(self) -> None:
        if self._mmap is None:
            raise ValueError("HostArena is closed")

    def close(self) -> None:
        """Unregisters and unmaps. Raises BufferError, and leaves the arena open and usable, while
        any tensor from the arena or any view of one is alive. Safe to call twice."""
        with self._lock:
            if self._mmap is None:
                return
            self._base = None
            if self._view_ref() is not None:
                gc.collect()  # a tensor held only by a reference cycle is garbage, not alive
            view = self._view_ref()
            if view is not None:
                self._base = torch.frombuffer(view, dtype=torch.uint8)
                del view
                num_blocks = len(self._blocks)
                raise BufferError(
                    "HostArena.close: tensors from this arena are still alive "
                    f"({num_blocks} block{'s' if num_blocks != 1 else ''}, {format_bytes(self.bytes_in_use)}, "
                    "not freed); delete them and every view of them first"
                )
            if self.pinned:
                self._unregister()  # already ran if the last tensor died before close()
                self.pinned = False
            self._mmap.close()
            self._mmap = None
