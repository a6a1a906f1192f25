"""A module buffer whose saved shape differs from the model's is refused, naming the file and the
buffer, at engine.load_checkpoint and at a snapshot restore: copy_ would broadcast a saved (1, 1)
value over a (3, 1) buffer without a word, or raise a RuntimeError naming neither."""

import os
import subprocess
import sys

import pytest
import torch

import memfit
from memfit.checkpointing import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Net(torch.nn.Module):
    def __init__(self, buffer_shape):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.full(buffer_shape, 7.0))

    def forward(self, x):
        return self.linear(x) * self.scale.sum()


CONFIG = {"train_micro_batch_size_per_gpu": 1}


def train_one_step(engine):
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()


@pytest.mark.parametrize("saved_shape", [(1, 1), (2,)], ids=["broadcasts", "does-not-broadcast"])
def test_load_checkpoint_refuses_a_buffer_of_another_shape(tmp_path, saved_shape):
    saved = memfit.initialize(Net(saved_shape), CONFIG)
    train_one_step(saved)
    directory = saved.save_checkpoint(tmp_path / "ckpt")
    model = Net((3, 1))
    engine = memfit.initialize(model, CONFIG)
    with pytest.raises(CheckpointError) as info:
        engine.load_checkpoint(tmp_path / "ckpt")
    assert str(info.value) == (
        f"{os.path.join(directory, 'rank0.pt')}: module buffer 'scale' has shape {saved_shape} there, (3, 1) in "
        "the model"
    )
    assert torch.equal(model.scale, torch.full((3, 1), 7.0))


SNAPSHOT_JOB = """
import sys

import torch

import memfit
from tests.unit.test_checkpoint_buffers import Net

rows, steps, shm_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
snapshot = {"interval_steps": 1, "shm_dir": shm_dir, "keep_shm": True}
engine = memfit.initialize(Net((rows, 1)), {"train_micro_batch_size_per_gpu": 1, "snapshot": snapshot})
for _ in range(steps):
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()
"""


def test_a_snapshot_restore_refuses_a_buffer_of_another_shape(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SNAPSHOT_JOB)
    shm_dir = str(tmp_path / "shm")

    def run(rows: int, steps: int, **env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), str(rows), str(steps), shm_dir],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": ROOT, **env},
        )

    first = run(1, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    slot = os.path.join(shm_dir, "rank0.slot1")
    # the job's fingerprint names the buffer's shapes first
    second = run(3, 0)
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if line.startswith("memfit.checkpointing")]
    assert len(errors) == 1 and errors[0].startswith(f"memfit.checkpointing.integrity.CheckpointError: {slot}: "), (
        errors
    )
    assert "does not match this job: scale float32(1, 1) saved, float32(3, 1) now" in errors[0]
    # forced past the fingerprint, the restore itself still refuses to broadcast the buffer
    forced = run(3, 0, MEMFIT_RESTORE_MISMATCHED="1")
    assert forced.returncode == 1
    errors = [line for line in forced.stderr.splitlines() if line.startswith("memfit.checkpointing")]
    assert errors == [
        f"memfit.checkpointing.integrity.CheckpointError: restoring the snapshot of step 2 failed: "
        f"{slot}: module buffer 'scale' has shape (1, 1) there, (3, 1) in the model"
    ], forced.stderr[-3000:]
