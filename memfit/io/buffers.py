"""Turns what users pass (CPU tensors, numpy arrays, any buffer-protocol object) into the span of
memory the engine transfers, refusing what cannot be transferred as one contiguous span of its own
values.

Refused, with a ValueError that says what to call instead: tensors off the CPU, non-contiguous or
non-dense tensors, conjugate and negative views (their bytes hold the unconjugated, un-negated
values; call .resolve_conj() / .resolve_neg()), quantized tensors (scale and zero point live
outside the bytes), and buffers of Python objects (their bytes are pointers).
"""

import ctypes
from typing import NamedTuple

import numpy as np
import torch


class Span(NamedTuple):
    address: int
    num_bytes: int
    dtype: torch.dtype | str  # a torch dtype, or numpy's name for types torch lacks
    shape: tuple[int, ...]
    owner: object  # keeps the memory alive, and exported so that it cannot be resized or moved


def buffer_span(obj, *, writable: bool, what: str = "buffer") -> Span:
    """The memory of obj. writable=True is required for reads into obj; what names the argument in
    errors."""
    if isinstance(obj, torch.Tensor):
        return _tensor_span(obj, what)
    try:
        view = memoryview(obj)
    except TypeError:
        raise ValueError(
            f"{what}: expected a CPU tensor or a buffer-protocol object, got {type(obj).__name__}"
        ) from None
    if "O" in view.format:
        raise ValueError(f"{what}: the buffer holds Python objects, whose bytes are pointers; it cannot be transferred")
    if not view.c_contiguous:
        raise ValueError(f"{what}: buffer must be C-contiguous")
    if writable and view.readonly:
        raise ValueError(f"{what}: cannot read into a read-only buffer ({type(obj).__name__})")
    flat = view if view.ndim == 1 and view.format == "B" else view.cast("B")
    address = np.frombuffer(flat, dtype=np.uint8).ctypes.data
    return Span(address, view.nbytes, _dtype_of(view), tuple(view.shape), view)


def _tensor_span(tensor: torch.Tensor, what: str) -> Span:
    if tensor.device.type != "cpu":
        raise ValueError(f"{what}: tensor must be on the CPU, got device {tensor.device}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{what}: tensor must be dense (strided), got layout {tensor.layout}")
    if tensor.is_quantized:
        raise ValueError(f"{what}: quantized tensors keep scale and zero point outside their bytes; call .dequantize()")
    if tensor.is_conj():
        raise ValueError(
            f"{what}: tensor is a conjugate view, whose bytes hold the unconjugated values; call .resolve_conj() first"
        )
    if tensor.is_neg():
        raise ValueError(
            f"{what}: tensor is a negative view, whose bytes hold the un-negated values; call .resolve_neg() first"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous; call .contiguous() first")
    return Span(tensor.data_ptr(), tensor.numel() * tensor.element_size(), tensor.dtype, tuple(tensor.shape), tensor)


def _dtype_of(view: memoryview) -> torch.dtype | str:
    """The torch dtype of a buffer's items (so a numpy float32 array and a float32 tensor match),
    or the buffer's own format where torch has no such type."""
    try:
        return torch.from_numpy(np.empty(0, dtype=np.asarray(view).dtype)).dtype
    except (TypeError, ValueError, NotImplementedError):
        return view.format


def memory_at(address: int, num_bytes: int) -> memoryview:
    """A writable byte view of memory that another object keeps alive."""
    return memoryview((ctypes.c_char * num_bytes).from_address(address)).cast("B")
