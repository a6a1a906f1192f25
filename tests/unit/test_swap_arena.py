"""SwapFile slots and HostArena blocks: placement, accounting, and the errors users hit."""

import errno

import pytest
import torch

from memfit.io import HostArena, SwapFile, SwapFullError
from memfit.io.extents import ExtentAllocator


def test_swap_round_trip_and_table(tmp_path, io_backend):
    tensors = {"w1": torch.randn(1000, 33), "m1": torch.randn(7), "b": torch.randn(4096).bfloat16()}
    with SwapFile(tmp_path / "swap", "8M", backend=io_backend) as swap:
        for request in [swap.put(name, t) for name, t in tensors.items()]:
            request.wait()
        assert sorted(swap.names()) == sorted(tensors)
        offsets = [offset for offset, _ in swap.table().values()]
        assert all(offset % 4096 == 0 for offset in offsets)
        assert swap.bytes_in_use == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, t in tensors.items():
            back = torch.empty_like(t)
            swap.get(name, back).wait()
            assert torch.equal(back, t)
        assert (tmp_path / "swap").stat().st_size == 8 << 20  # preallocated once, never grows


def test_swap_overwrite_in_place(tmp_path):
    with SwapFile(tmp_path / "swap", "1M") as swap:
        swap.put("x", torch.zeros(100)).wait()
        offset = swap.table()["x"][0]
        swap.put("x", torch.ones(100)).wait()
        assert swap.table()["x"][0] == offset
        back = torch.empty(100)
        swap.get("x", back).wait()
        assert torch.equal(back, torch.ones(100))


def test_swap_errors(tmp_path):
    with SwapFile(tmp_path / "swap", "64K") as swap:
        swap.put("a", torch.zeros(8000)).wait()  # 32000 bytes -> 32 KiB slot
        with pytest.raises(KeyError, match="'missing'"):
            swap.get("missing", torch.empty(1))
        with pytest.raises(ValueError, match="holds 32000 bytes, destination has 4"):
            swap.get("a", torch.empty(1))
        with pytest.raises(ValueError, match="remove"):
            swap.put("a", torch.zeros(10))
        before = (tmp_path / "swap").read_bytes()
        with pytest.raises(SwapFullError) as info:
            swap.put("b", torch.ones(9000))  # 36000 bytes > 32 KiB left
        assert info.value.errno == errno.ENOSPC
        assert "b" not in swap
        assert (tmp_path / "swap").read_bytes() == before  # nothing written
        swap.remove("a")
        swap.put("b", torch.ones(9000)).wait()
        assert swap.free_bytes == 64 * 1024 - 36864


def test_extent_allocator_coalesces():
    extents = ExtentAllocator(10 * 4096)
    a, b, c = extents.allocate(4096), extents.allocate(5000), extents.allocate(1)
    assert (a, b, c) == (0, 4096, 3 * 4096)
    extents.release(b, 5000)
    extents.release(a, 4096)
    extents.release(c, 1)
    assert extents.largest_free_bytes == 10 * 4096
    assert extents.allocate(10 * 4096) == 0
    assert extents.allocate(1) is None


def test_arena_exact_size_aligned_blocks_and_accounting():
    arena = HostArena("16M")
    a = arena.alloc((1000, 3), torch.float32)
    b = arena.alloc(5)
    c = arena.alloc(2 << 20, torch.bfloat16)
    for t in (a, b, c):
        assert t.data_ptr() % 4096 == 0
        assert arena.owns(t)
    assert a.shape == (1000, 3) and a.dtype == torch.float32
    assert b.shape == (5,) and b.dtype == torch.uint8
    assert arena.bytes_in_use == 12000 + 5 + (4 << 20)
    assert arena.reserved_bytes == 12288 + 4096 + (4 << 20)  # 4 KiB rounding only, no power of two
    a.fill_(1.5)
    c.fill_(2)
    assert a.sum().item() == 4500 and c.float().sum().item() == 2 * (2 << 20)
    peak = arena.bytes_in_use
    arena.free(a)
    arena.free(c)
    assert arena.bytes_in_use == 5 and arena.peak_bytes == peak
    with pytest.raises(ValueError, match="not allocated from this arena"):
        arena.free(a)
    # b still sits at 12 KiB; everything after it was freed and coalesced into one block.
    big = arena.alloc(16 * (1 << 20) - 16384)
    assert big.data_ptr() - arena.address == 16384


def test_arena_full_error_names_sizes():
    arena = HostArena("1M")
    arena.alloc("768K")
    with pytest.raises(MemoryError, match=r"host arena full: 512\.0 KiB requested, 256\.0 KiB free of 1\.0 MiB"):
        arena.alloc("512K")


def test_arena_tensor_feeds_direct_io_without_bounce(tmp_path, io_backend):
    from memfit.io import AsyncFile

    arena = HostArena("6M")
    data = arena.alloc(3 << 20)
    data.copy_(torch.randint(0, 255, (3 << 20,), dtype=torch.uint8))
    back = arena.alloc(3 << 20)
    with AsyncFile(tmp_path / "f", "w", backend=io_backend) as f:
        f.pwrite(data, 0).wait()
        f.pread(back, 0).wait()
    assert torch.equal(back, data)
