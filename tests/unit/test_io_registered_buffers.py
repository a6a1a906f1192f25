"""Registered buffers: bytes round-trip exactly whether a transfer lies inside registered memory,
straddles its end or falls back to the buffered descriptor; engines opened after a registration
get it too; close() releases it and is safe twice. Every backend runs the same transfers (only
io_uring registers; the others ignore registrations)."""

import random
import warnings

import numpy as np
import pytest
import torch

from memfit.io import AsyncFile, HostArena, available_backends, register_buffer
from memfit.io.engine import _registrations


def random_bytes(seed: int, num_bytes: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(random.Random(seed).randbytes(num_bytes), dtype=np.uint8).copy())


@pytest.fixture
def arena():
    arena = HostArena(8 << 20)
    yield arena


@pytest.mark.parametrize("offset", [0, 4096, 4096 + 100])
def test_round_trip_through_registered_memory(tmp_path, io_backend, arena, offset):
    source, target = arena.alloc(3 << 20), arena.alloc(3 << 20)
    source.copy_(random_bytes(offset, source.numel()))
    # The target is registered in part only: pieces past its first 1 MiB are plain transfers.
    with register_buffer(source), register_buffer(target[: 1 << 20]):
        with AsyncFile(tmp_path / "f", "w", backend=io_backend, block_size="256K", queue_depth=4) as f:
            assert f.pwrite(source, offset).wait() == source.numel()
            assert f.pread(target, offset).wait() == target.numel()
    assert torch.equal(target, source)
    assert not _registrations


def test_short_read_at_end_of_file_into_registered_memory(tmp_path, io_backend, arena):
    data = random_bytes(1, 10000)
    (tmp_path / "f").write_bytes(data.numpy().tobytes())
    target = arena.alloc(1 << 20)
    with register_buffer(target), AsyncFile(tmp_path / "f", "r", backend=io_backend, block_size="64K") as f:
        assert f.pread(target, 0, allow_short=True).wait() == 10000
    assert torch.equal(target[:10000], data)


def test_engines_opened_later_get_the_registration(tmp_path, arena):
    if "io_uring" not in available_backends():
        pytest.skip("io_uring backend not available here")
    buffer = arena.alloc(1 << 20)
    buffer.copy_(random_bytes(2, buffer.numel()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        registration = register_buffer(buffer)
        before = registration.num_fixed_entries
        # A geometry no other test uses: a new engine, created after the registration.
        with AsyncFile(tmp_path / "f", "w", backend="io_uring", block_size="76K", queue_depth=3) as f:
            f.pwrite(buffer, 0).wait()
            back = torch.zeros_like(buffer)
            f.pread(back, 0).wait()
    assert torch.equal(back, buffer)
    if caught:  # a kernel before 5.19 or a low RLIMIT_MEMLOCK: said once, transfers stay plain
        assert "register_buffer: io_uring refused" in str(caught[0].message)
    else:
        assert registration.num_fixed_entries == before + 1
    registration.close()
    registration.close()
    assert registration.num_fixed_entries == 0


def test_registration_holds_its_memory(arena):
    buffer = arena.alloc(1 << 20)
    registration = register_buffer(buffer)
    del buffer
    with pytest.raises(BufferError):
        arena.close()  # the registration still holds the block
    registration.close()
    arena.close()
