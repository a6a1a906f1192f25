"""What users pass to AsyncFile is checked before anything reaches the engine: a buffer whose raw
bytes are not its values, an offset no file can have, or a buffer that could move while the kernel
writes into it is refused with one clear error, never written as garbage or crashed on."""

import warnings

import numpy as np
import pytest
import torch

from memfit.io import AsyncFile


@pytest.fixture
def f(tmp_path, io_backend):
    with AsyncFile(tmp_path / "f", "w", backend=io_backend, block_size="4K") as opened:
        yield opened


def complex_values() -> torch.Tensor:
    return torch.tensor([1 + 2j, 3 - 4j, -5 + 6j], dtype=torch.complex64)


@pytest.mark.parametrize(
    "make_view, fix",
    [
        (lambda: complex_values().conj(), "resolve_conj"),
        (lambda: torch.arange(6.0)._neg_view(), "resolve_neg"),
        (lambda: complex_values().conj().imag, "resolve_neg"),  # imag of a conjugate view is a negative view
    ],
)
def test_conjugate_and_negative_views_are_refused_both_ways(f, make_view, fix):
    view = make_view()
    with pytest.raises(ValueError, match=rf"buffer: .*view.*call \.{fix}\(\)"):
        f.pwrite(view, 0)
    with pytest.raises(ValueError, match=rf"into: .*view.*call \.{fix}\(\)"):
        f.pread(view, 0)
    resolved = view.resolve_conj().resolve_neg()  # what the error asks for round-trips exactly
    f.pwrite(resolved, 0).wait()
    back = torch.empty_like(resolved)
    f.pread(back, 0).wait()
    assert torch.equal(back, make_view())


def test_non_strided_and_quantized_tensors_are_refused(f):
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (4,), check_invariants=True)
    with pytest.raises(ValueError, match="buffer: tensor must be dense .*sparse_coo"):
        f.pwrite(sparse, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated, not yet gone
        quantized = torch.quantize_per_tensor(torch.randn(8), 0.1, 3, torch.qint8)
    with pytest.raises(ValueError, match="buffer: quantized tensors .*dequantize"):
        f.pwrite(quantized, 0)


MAX_OFFSET = 2**63 - 1


@pytest.mark.parametrize("offset", [-1, 2**63, 2**64, 2**64 + 1, -(2**70), MAX_OFFSET, MAX_OFFSET - 2])
def test_offsets_beyond_any_file_are_a_value_error_naming_the_argument(f, offset):
    for submit in (lambda: f.pwrite(b"abcd", offset), lambda: f.pread(bytearray(4), offset)):
        with pytest.raises(ValueError, match=r"^offset: "):
            submit()
    # The file still works.
    assert f.pwrite(b"abcd", 0).wait() == 4


@pytest.mark.parametrize("offset", [1.0, "0", True, None])
def test_offsets_that_are_not_integers_are_a_value_error(f, offset):
    with pytest.raises(ValueError, match=r"^offset: must be a non-negative integer"):
        f.pwrite(b"abcd", offset)


def test_numpy_and_torch_integer_offsets_are_accepted(f):
    assert f.pwrite(b"abcd", np.int64(4096)).wait() == 4
    back = bytearray(4)
    assert f.pread(back, torch.tensor(4096)).wait() == 4
    assert back == b"abcd"


@pytest.mark.parametrize("size, message", [(2**63, "size: "), (-1, "size: must not be negative"), (1.5, "size: ")])
def test_preallocation_sizes_are_checked(tmp_path, io_backend, size, message):
    with pytest.raises(ValueError, match=message):
        AsyncFile(tmp_path / "f", "w", size=size, backend=io_backend)


def test_preallocating_a_read_only_file_is_refused(tmp_path, io_backend):
    (tmp_path / "f").write_bytes(b"abc")
    with pytest.raises(ValueError, match="size: cannot preallocate a file opened read-only"):
        AsyncFile(tmp_path / "f", "r", size="1M", backend=io_backend)


def test_a_buffer_cannot_move_while_its_request_is_unfinished(f):
    """A bytearray that grew while the kernel wrote into it would move, and the read would land in
    freed memory. The request holds the buffer exported until wait(), so resizing is refused."""
    f.pwrite(bytes(range(256)) * 4096, 0).wait()
    target = bytearray(1 << 20)
    request = f.pread(target, 0)
    with pytest.raises(BufferError):
        target.extend(b"more")
    assert request.wait() == 1 << 20
    target.extend(b"more")  # the export ends with the request
    assert target[:256] == bytes(range(256))


def test_object_arrays_are_refused(f):
    """Their bytes are object pointers: written they mean nothing, read into they crash Python."""
    objects = np.array([None, 1, "x"], dtype=object)
    with pytest.raises(ValueError, match="into: .*Python objects"):
        f.pread(objects, 0)
    with pytest.raises(ValueError, match="buffer: .*Python objects"):
        f.pwrite(memoryview(objects), 0)


def test_errors_name_the_argument(f):
    with pytest.raises(ValueError, match=r"^buffer: tensor must be contiguous"):
        f.pwrite(torch.zeros(4, 4).t(), 0)
    with pytest.raises(ValueError, match=r"^into: tensor must be contiguous"):
        f.pread(torch.zeros(4, 4).t(), 0)
    with pytest.raises(ValueError, match=r"^into: cannot read into a read-only buffer \(bytes\)"):
        f.pread(b"immutable", 0)
    with pytest.raises(ValueError, match=r"^buffer: expected a CPU tensor or a buffer-protocol object, got int"):
        f.pwrite(12, 0)
    with pytest.raises(ValueError, match=r"^buffer: tensor must be on the CPU, got device meta"):
        f.pwrite(torch.empty(4, device="meta"), 0)
