"""HostArena: one anonymous mmap carved into exact-size, 4 KiB-aligned tensors.

torch's pinned allocator rounds every block up to a power of two (a 2.1 GiB request takes 4 GiB);
the arena reserves only the 4 KiB-rounded size, and is registered with CUDA once, as a whole,
when a GPU is present.
"""

import math
import mmap
import warnings

import torch

from memfit.io.extents import ExtentAllocator, align_up
from memfit.units import format_bytes, parse_size


class HostArena:
    def __init__(self, capacity_bytes, *, register_cuda: bool | None = None):
        capacity = align_up(parse_size(capacity_bytes))
        if capacity <= 0:
            raise ValueError(f"capacity_bytes: must be positive, got {capacity_bytes!r}")
        self.capacity_bytes = capacity
        self._mmap = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._base = torch.frombuffer(self._mmap, dtype=torch.uint8)
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

    @property
    def address(self) -> int:
        return self._base.data_ptr()

    def alloc(self, size, dtype: torch.dtype | None = None) -> torch.Tensor:
        """alloc(nbytes) gives a uint8 tensor of nbytes; alloc(shape, dtype) a tensor of that shape.
        Every block starts on a 4 KiB boundary and takes exactly its size, rounded up to 4 KiB."""
        if dtype is None:
            dtype, shape = torch.uint8, (parse_size(size),)
        else:
            shape = (size,) if isinstance(size, int) else tuple(size)
        if any(dim < 0 for dim in shape):
            raise ValueError(f"size: dimensions must not be negative, got {shape}")
        num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if num_bytes == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self._extents.allocate(num_bytes)
        if offset is None:
            raise MemoryError(
                f"host arena full: {format_bytes(num_bytes)} requested, {format_bytes(self._extents.free_bytes)} free "
                f"of {format_bytes(self.capacity_bytes)} "
                f"(largest free block {format_bytes(self._extents.largest_free_bytes)})"
            )
        tensor = self._base[offset : offset + num_bytes].view(dtype).view(shape)
        self._blocks[tensor.data_ptr()] = num_bytes
        self.bytes_in_use += num_bytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_in_use)
        return tensor

    def free(self, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:
            return
        num_bytes = self._blocks.pop(tensor.data_ptr(), None)
        if num_bytes is None:
            raise ValueError("tensor was not allocated from this arena (or was freed already)")
        self._extents.release(tensor.data_ptr() - self.address, num_bytes)
        self.bytes_in_use -= num_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes taken from the arena, each block rounded up to 4 KiB."""
        return sum(align_up(num_bytes) for num_bytes in self._blocks.values())

    def owns(self, tensor: torch.Tensor) -> bool:
        return self.address <= tensor.data_ptr() < self.address + self.capacity_bytes

    def close(self) -> None:
        """Unregisters and unmaps; fails if tensors from the arena are still alive."""
        if self._mmap is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.pinned = False
        self._base = None
        self._mmap.close()
        self._mmap = None
