"""First-fit extent allocator over [0, capacity) in 4 KiB units, with coalescing on free. Shared by
the host arena and the swap file."""

import bisect

ALIGNMENT = 4096


def align_up(num_bytes: int) -> int:
    return -(-num_bytes // ALIGNMENT) * ALIGNMENT


class ExtentAllocator:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes // ALIGNMENT * ALIGNMENT
        self._free: list[tuple[int, int]] = [(0, self.capacity_bytes)] if self.capacity_bytes else []

    def allocate(self, num_bytes: int) -> int | None:
        """Offset of a free 4 KiB-aligned extent of at least num_bytes, or None if none fits."""
        size = align_up(max(num_bytes, 1))
        for index, (offset, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, length - size)
                return offset
        return None

    def release(self, offset: int, num_bytes: int) -> None:
        size = align_up(max(num_bytes, 1))
        index = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(index, (offset, size))
        if index + 1 < len(self._free) and offset + size == self._free[index + 1][0]:
            self._free[index] = (offset, size + self._free.pop(index + 1)[1])
        if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == offset:
            previous = self._free.pop(index - 1)
            self._free[index - 1] = (previous[0], previous[1] + self._free[index - 1][1])

    @property
    def largest_free_bytes(self) -> int:
        return max((length for _, length in self._free), default=0)

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._free)
