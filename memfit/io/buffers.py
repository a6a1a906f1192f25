"""Turns what users pass (CPU tensors, numpy arrays, any buffer-protocol object) into (address,
nbytes), refusing what cannot be transferred as one contiguous span."""

import ctypes

import numpy as np
import torch


def buffer_span(obj, *, writable: bool) -> tuple[int, int]:
    """Returns (address, nbytes) of obj's memory. writable=True is required for reads into obj."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise ValueError(f"tensor must be on the CPU, got device {obj.device}")
        if not obj.is_contiguous():
            raise ValueError("tensor must be contiguous; call .contiguous() first")
        return obj.data_ptr(), obj.numel() * obj.element_size()
    try:
        view = memoryview(obj)
    except TypeError:
        raise ValueError(f"expected a CPU tensor or a buffer-protocol object, got {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if writable and view.readonly:
        raise ValueError(f"cannot read into a read-only buffer ({type(obj).__name__})")
    array = np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, dtype=np.uint8)
    return array.ctypes.data, array.nbytes


def memory_at(address: int, num_bytes: int) -> memoryview:
    """A writable byte view of memory that another object keeps alive."""
    return memoryview((ctypes.c_char * num_bytes).from_address(address)).cast("B")
