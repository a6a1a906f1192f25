"""Checksums for checkpoint files: every tensor, the non-tensor rest of a payload, and each whole
file, with xxHash's XXH3 (64-bit), which hashes at memory speed.

A payload is a nested dict of tensors, numbers, strings and lists. Each tensor is named by its
path in the payload ("params/mlp.weight", "optimizer_state/mlp.weight/exp_avg"), so a failed
check names the tensor. The rest (step counters, hyperparameters, scheduler and client state)
is hashed through a canonical JSON text, so a flipped digit there is caught as well."""

import json
import os

import torch
import xxhash

from memfit.checkpointing.faults import fault_point


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; the message names the file,
    and the tensor where one is at fault."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and bytes."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    hasher = xxhash.xxh3_64(f"{data.dtype}{tuple(data.shape)}".encode())
    hasher.update(data.contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def walk_tensors(payload, prefix: str = ""):
    """(path, tensor) for every tensor in a nested payload."""
    if torch.is_tensor(payload):
        yield prefix, payload
    elif isinstance(payload, dict):
        for key, value in payload.items():
            yield from walk_tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(payload, (list, tuple)):
        for index, value in enumerate(payload):
            yield from walk_tensors(value, f"{prefix}/{index}" if prefix else str(index))


def _without_tensors(payload):
    if torch.is_tensor(payload):
        return "<tensor>"
    if isinstance(payload, dict):
        return {str(key): _without_tensors(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [_without_tensors(value) for value in payload]
    return payload


def metadata_digest(payload) -> str:
    """Digest of everything in the payload except tensor data (a tensor's place is kept)."""
    text = json.dumps(_without_tensors(payload), sort_keys=True, default=repr, allow_nan=True)
    return xxhash.xxh3_64_hexdigest(text.encode())


def payload_digests(payload) -> dict:
    return {
        "metadata": metadata_digest(payload),
        "tensors": {path: tensor_digest(tensor) for path, tensor in walk_tensors(payload)},
    }


MIDDLE_OF_FILE_BYTES = 1 << 20


class HashingWriter:
    """A write-only file object that hashes what passes through it and keeps the first OSError,
    so a failed torch.save can be reported with its errno (torch re-raises it as a RuntimeError)."""

    def __init__(self, file):
        self.file = file
        self.hasher = xxhash.xxh3_64()
        self.num_bytes = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self.num_bytes < MIDDLE_OF_FILE_BYTES <= self.num_bytes + len(data):
            fault_point("checkpoint-writing")  # once per file, part of it written
        try:
            written = self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        self.hasher.update(data)
        self.num_bytes += len(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def file_digest(path: str, chunk_bytes: int = 16 << 20) -> str:
    hasher = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            hasher.update(chunk)
    return hasher.hexdigest()


def fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def describe_os_error(error: OSError, path: str) -> str:
    import errno

    name = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else "error"
    return f"{path}: {error.strerror or error} ({name})"
