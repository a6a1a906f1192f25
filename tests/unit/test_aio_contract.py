"""One contract for every I/O backend: byte-exact round trips at any size, offset and alignment,
many requests in flight, and a fuzz run against a bytearray model of the file."""

import random

import numpy as np
import pytest
import torch

from memfit.io import AsyncFile, HostArena

SIZES = [1, 4095, 4096, 4097, 8191, (1 << 20) + 1, 3 * (1 << 20) + 12345, 5 * (1 << 20) - 7]


def random_bytes(rng: random.Random, num_bytes: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(rng.randbytes(num_bytes), dtype=np.uint8).copy())


@pytest.mark.parametrize("num_bytes", SIZES)
@pytest.mark.parametrize("offset", [0, 1, 4096, 12288 + 511])
def test_round_trip_sizes_and_offsets(tmp_path, io_backend, num_bytes, offset):
    rng = random.Random(num_bytes * 7 + offset)
    data = random_bytes(rng, num_bytes)
    with AsyncFile(tmp_path / "f", "w", backend=io_backend, block_size="64K", queue_depth=8) as f:
        assert f.pwrite(data, offset).wait() == num_bytes
        back = torch.empty_like(data)
        assert f.pread(back, offset).wait() == num_bytes
    assert torch.equal(back, data)
    assert (tmp_path / "f").stat().st_size == offset + num_bytes


@pytest.mark.parametrize("shift", [0, 1, 7, 2048])
def test_unaligned_memory_goes_through_bounce_buffer(tmp_path, io_backend, shift):
    arena = HostArena(8 << 20)
    backing = arena.alloc(3 * 4096 * 64 + shift)
    data = backing[shift:]  # aligned file offset and length, misaligned address
    data.copy_(random_bytes(random.Random(shift), data.numel()))
    with AsyncFile(tmp_path / "f", "w", backend=io_backend, block_size="16K") as f:
        assert f.direct
        f.pwrite(data, 8192).wait()
        back = torch.zeros(data.numel() + shift, dtype=torch.uint8)[shift:]
        f.pread(back, 8192).wait()
    assert torch.equal(back, data)


def test_many_requests_in_flight_on_several_files(tmp_path, io_backend):
    rng = random.Random(1)
    files = [AsyncFile(tmp_path / f"f{i}", "w", backend=io_backend, block_size="32K", queue_depth=4) for i in range(3)]
    chunks = [(files[i % 3], i * 70001, random_bytes(rng, rng.randrange(1, 200_000))) for i in range(60)]
    writes = [f.pwrite(data, offset) for f, offset, data in chunks]
    assert [w.wait() for w in writes] == [data.numel() for _, _, data in chunks]
    backs = [(torch.empty_like(data), data) for _, _, data in chunks]
    reads = [f.pread(back, offset) for (f, offset, _), (back, _) in zip(chunks, backs)]
    for read, (back, data) in zip(reads, backs):
        assert read.wait() == data.numel()
        assert torch.equal(back, data)
    for f in files:
        f.close()


@pytest.mark.parametrize("kind", ["numpy", "bytearray", "bytes", "bfloat16"])
def test_accepts_buffer_protocol_and_any_dtype(tmp_path, io_backend, kind):
    rng = np.random.default_rng(0)
    if kind == "numpy":
        data, back = rng.standard_normal(1000), np.empty(1000)
    elif kind == "bytearray":
        data, back = bytearray(rng.bytes(5000)), bytearray(5000)
    elif kind == "bytes":
        data, back = rng.bytes(5000), bytearray(5000)
    else:
        data, back = torch.randn(3, 1001).bfloat16(), torch.empty(3, 1001, dtype=torch.bfloat16)
    with AsyncFile(tmp_path / "f", "w", backend=io_backend) as f:
        f.pwrite(data, 100).wait()
        f.pread(back, 100).wait()
    if kind == "bfloat16":
        assert torch.equal(back, data)
    else:
        assert bytes(memoryview(back).cast("B")) == bytes(memoryview(data).cast("B"))


def test_rejects_non_contiguous_and_read_only_targets(tmp_path, io_backend):
    with AsyncFile(tmp_path / "f", "w", backend=io_backend) as f:
        with pytest.raises(ValueError, match="contiguous"):
            f.pwrite(torch.zeros(8, 8).t(), 0)
        with pytest.raises(ValueError, match="read-only"):
            f.pread(b"immutable", 0)
        with pytest.raises(ValueError, match="offset"):
            f.pwrite(b"x", -1)


def test_short_read_is_an_error_unless_allowed(tmp_path, io_backend):
    with AsyncFile(tmp_path / "f", "w", backend=io_backend) as f:
        f.pwrite(bytes(range(256)) * 40, 0).wait()  # 10240 bytes
        back = bytearray(16384)
        with pytest.raises(OSError, match="end of file") as info:
            f.pread(back, 0).wait()
        assert info.value.filename == str(tmp_path / "f")
        assert f.pread(back, 0, allow_short=True).wait() == 10240
        assert bytes(back[:10240]) == bytes(range(256)) * 40
        assert f.pread(bytearray(10), 20000, allow_short=True).wait() == 0


def test_zero_byte_requests_complete(tmp_path, io_backend):
    with AsyncFile(tmp_path / "f", "w", backend=io_backend) as f:
        assert f.pwrite(b"", 0).wait() == 0
        assert f.pread(bytearray(), 0).wait() == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_against_bytearray_model(tmp_path, io_backend, seed):
    """Thousands of random writes and reads; the file must always equal the model."""
    rng = random.Random(seed)
    file_bytes = 3 << 20
    model = bytearray(file_bytes)
    mismatches = 0
    with AsyncFile(tmp_path / "f", "w", size=file_bytes, backend=io_backend, block_size="16K", queue_depth=8) as f:
        for _ in range(250):
            # A batch of non-overlapping writes in flight together, then reads of random ranges.
            cuts = sorted(rng.sample(range(file_bytes), 8))
            writes = []
            for begin, end in zip(cuts[::2], cuts[1::2]):
                end = min(end, begin + 300_000)
                chunk = rng.randbytes(end - begin)
                model[begin:end] = chunk
                writes.append(f.pwrite(chunk, begin))
            for w in writes:
                w.wait()
            reads = []
            for _ in range(8):
                begin = rng.randrange(file_bytes)
                length = rng.randrange(1, min(200_000, file_bytes - begin) + 1)
                back = bytearray(length)
                reads.append((f.pread(back, begin), back, begin))
            for request, back, begin in reads:
                request.wait()
                mismatches += back != model[begin : begin + len(back)]
    assert mismatches == 0
