"""Byte-level text data. The default corpus is the Python standard library's own source files,
present on every machine. The split is by file (a stable hash of its relative path), and batches
are drawn from a generator seeded by (seed, step), so any step's batch can be rebuilt: the data
position is just the step number."""

import os
import sysconfig
import zlib

import numpy as np
import torch


def default_corpus_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def load_corpus(path: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(train bytes, validation bytes, description). path: a text file or a folder; None for the
    standard library's .py files. Every 20th file by hash goes to validation."""
    if path is not None and os.path.isfile(path):
        data = np.fromfile(path, dtype=np.uint8)
        cut = int(len(data) * 0.95)
        return data[:cut], data[cut:], path
    root = path or default_corpus_root()
    if not os.path.isdir(root):
        raise SystemExit(f"--data {root}: no such file or folder")
    train, validation = [], []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            if path is None and not name.endswith(".py"):
                continue
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            with open(full, "rb") as f:
                content = f.read()
            (validation if zlib.crc32(relative.encode()) % 20 == 0 else train).append(content)
    if not train or not validation:
        raise SystemExit(f"--data {root}: too few files to split into train and validation")
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)  # noqa: E731
    return join(train), join(validation), root


def batch_for(
    data: np.ndarray,
    step: int,
    micro_step: int,
    rank: int,
    *,
    seed: int,
    micro_batch: int,
    accumulation_steps: int,
    world_size: int,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch of global step `step`: (inputs, targets), each (micro_batch, seq_len)."""
    global_batch = micro_batch * accumulation_steps * world_size
    generator = np.random.default_rng([seed, step])
    starts = generator.integers(0, len(data) - seq_len - 1, size=global_batch)
    first = (rank * accumulation_steps + micro_step) * micro_batch
    windows = np.stack([data[s : s + seq_len + 1] for s in starts[first : first + micro_batch]])
    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens[:, :-1], tokens[:, 1:]
