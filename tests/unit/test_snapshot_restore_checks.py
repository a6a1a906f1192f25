"""Restoring from memory checks the tensors of the slot it restores, and only that slot: a flipped
byte in the newest slot restores the previous snapshot (the newest is checked while it is copied,
the previous one restored over what it left), one in the older slot is never read when the newest
one is good, and with both slots damaged the job stops instead of training on a half-restored
state. One process, one rank, its own agent."""

import json
import os
import subprocess
import sys

import pytest

from memfit.checkpointing.slots import SlotReader, layout, slot_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SNAPSHOT_JOB = """
import json
import sys

import torch
import xxhash

import memfit

phase, shm_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
snapshot = {"interval_steps": 1, "shm_dir": shm_dir, "keep_shm": True}
config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "snapshot": snapshot}
engine = memfit.initialize(torch.nn.Linear(4, 4), config)
weights = []  # the weight's digest after each step
for _ in range(3 if phase == "train" else 0):
    engine.backward(engine(torch.randn(2, 4)).square().mean())
    engine.step()
    weights.append(xxhash.xxh3_64_hexdigest(engine.module.weight.detach().numpy().tobytes()))
weight = xxhash.xxh3_64_hexdigest(engine.module.weight.detach().numpy().tobytes())
print(json.dumps({"restored_from": engine.restored_from, "weights": weights, "weight": weight}))
"""


def run(tmp_path, phase: str, expect_failure: bool = False) -> tuple[dict, str]:
    """(what the job printed, its stderr)"""
    script = tmp_path / "job.py"
    script.write_text(SNAPSHOT_JOB)
    done = subprocess.run(
        [sys.executable, str(script), phase, str(tmp_path / "shm")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    if expect_failure:
        assert done.returncode != 0, done.stdout[-3000:]
        return {}, done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def flip_optimizer_byte(tmp_path, step: int, prefix: str = "optimizer_state/") -> str:
    """Flips a byte of the first tensor under prefix in the slot of step; returns the slot's path."""
    reader = next(
        reader
        for reader in (SlotReader(slot_path(str(tmp_path / "shm"), 0, slot)) for slot in (0, 1))
        if reader.step == step
    )
    placed = {path: offset for path, _, offset in layout(reader.payload())[0]}
    offset = placed[next(path for path in placed if path.startswith(prefix))] + 3
    with open(reader.path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x10]))
    return reader.path


def test_a_flipped_byte_in_the_newest_slot_restores_the_previous_snapshot(tmp_path):
    trained, _ = run(tmp_path, "train")
    bad_slot = flip_optimizer_byte(tmp_path, 3)
    restored, log = run(tmp_path, "restore")
    assert restored["restored_from"] == 2
    assert restored["weight"] == trained["weights"][1]  # the weight of step 2, bit for bit
    assert f"snapshot slot skipped: {bad_slot}: checksum mismatch in tensor 'optimizer_state/" in log


def test_a_flipped_byte_in_the_older_slot_is_not_read(tmp_path):
    trained, _ = run(tmp_path, "train")
    flip_optimizer_byte(tmp_path, 2)
    restored, log = run(tmp_path, "restore")
    assert restored["restored_from"] == 3
    assert restored["weight"] == trained["weights"][2]
    assert "snapshot slot skipped" not in log


@pytest.mark.slow  # two jobs of about 10 s each
def test_a_flipped_byte_in_a_parameter_of_the_newest_slot_is_overwritten_by_the_previous_snapshot(tmp_path):
    trained, _ = run(tmp_path, "train")
    bad_slot = flip_optimizer_byte(tmp_path, 3, prefix="params/weight")
    restored, log = run(tmp_path, "restore")
    assert restored["restored_from"] == 2
    assert restored["weight"] == trained["weights"][1]  # not the damaged weight read first
    assert f"snapshot slot skipped: {bad_slot}: checksum mismatch in tensor 'params/weight'" in log


@pytest.mark.slow  # two jobs of about 10 s each
def test_both_slots_damaged_stops_the_job_instead_of_starting_fresh(tmp_path):
    run(tmp_path, "train")
    flip_optimizer_byte(tmp_path, 3)
    flip_optimizer_byte(tmp_path, 2)
    _, log = run(tmp_path, "restore", expect_failure=True)
    assert "failed its checksums while it was being restored" in log
    assert "the job cannot resume" in log
