"""Writes the safetensors format one tensor at a time, so a model larger than RAM exports with
one tensor in memory: the header (names, dtypes, shapes, byte offsets) is computed from shapes
alone, then each tensor's bytes are appended. The layout is the format's own: an 8-byte little-
endian header length, the JSON header padded with spaces to a multiple of 8, then the data."""

import json
import struct

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} has no safetensors equivalent")
    return SAFETENSORS_DTYPES[dtype]


def write_safetensors(path: str, entries: list[tuple[str, torch.Size, torch.dtype]], tensor_of, metadata=None) -> int:
    """entries: (name, shape, dtype) in file order; tensor_of(name) returns that tensor, read only
    when its bytes are written. Returns the bytes of tensor data written."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        num_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _dtype_name(name, dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + num_bytes],
        }
        offset += num_bytes
    if metadata:
        header["__metadata__"] = {key: str(value) for key, value in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name, shape, dtype in entries:
            tensor = tensor_of(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            file.write(memoryview(data.numpy()))
    return offset
