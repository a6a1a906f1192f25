"""A client state that a restore could not load (a numpy scalar, a datetime, any other object) is
refused when it is given or saved, naming the key path and the type; what is accepted restores
exactly, from a checkpoint and from a snapshot."""

import datetime
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import memfit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = {"train_micro_batch_size_per_gpu": 1}
ALLOWED = "None, bools, numbers, strings, bytes, tensors, and dicts, lists or tuples of them"
# one value of every accepted kind, nested
EVERY_KIND = {
    "position": 7,
    "loss": 0.25,
    "done": False,
    "name": "shard-3",
    "raw": b"\x00\x01",
    "nothing": None,
    "order": [3, 1, 2],
    "pair": (1, "a"),
    "weights": torch.arange(3.0),
    1: {"nested": [{"deep": 2.5}]},
}


def train_one_step(engine):
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()


@pytest.mark.parametrize(
    "state,path,kind",
    [
        ({"position": np.int64(5)}, "client_state['position']", "numpy.int64"),
        (
            {"epoch": {"started": datetime.datetime(2026, 1, 1)}},
            "client_state['epoch']['started']",
            "datetime.datetime",
        ),
        ({"history": [1.0, np.float64(2.0)]}, "client_state['history'][1]", "numpy.float64"),
        ({"rng": np.random.default_rng(0)}, "client_state['rng']", "numpy.random._generator.Generator"),
        ({"seen": {"a", "b"}}, "client_state['seen']", "set"),
    ],
)
def test_set_client_state_and_save_checkpoint_refuse_what_a_restore_cannot_load(tmp_path, state, path, kind):
    engine = memfit.initialize(torch.nn.Linear(4, 4), CONFIG)
    message = f"{path}: a {kind} cannot be restored from a snapshot or checkpoint; store {ALLOWED}"
    with pytest.raises(ValueError) as info:
        engine.set_client_state(state)
    assert str(info.value) == f"engine.set_client_state: {message}"
    with pytest.raises(ValueError) as info:
        engine.save_checkpoint(tmp_path / "ckpt", client_state=state)
    assert str(info.value) == f"save_checkpoint: {message}"
    assert not (tmp_path / "ckpt").exists()  # refused before anything is written


def test_every_accepted_kind_restores_exactly_from_a_checkpoint(tmp_path):
    engine = memfit.initialize(torch.nn.Linear(4, 4), CONFIG)
    train_one_step(engine)
    engine.save_checkpoint(tmp_path / "ckpt", client_state=EVERY_KIND)
    restored = memfit.initialize(torch.nn.Linear(4, 4), CONFIG).load_checkpoint(tmp_path / "ckpt")
    assert repr(restored) == repr(EVERY_KIND)


SNAPSHOT_JOB = """
import sys

import numpy as np
import torch

import memfit
from tests.unit.test_client_state import EVERY_KIND, train_one_step

phase, shm_dir = sys.argv[1], sys.argv[2]
snapshot = {"interval_steps": 1, "shm_dir": shm_dir, "keep_shm": True}
engine = memfit.initialize(torch.nn.Linear(4, 4), {"train_micro_batch_size_per_gpu": 1, "snapshot": snapshot})
if phase == "train":
    state = dict(EVERY_KIND)
    engine.set_client_state(state)
    train_one_step(engine)
    train_one_step(engine)
    state["position"] = np.int64(8)  # updated in place, as a loop does, with a numpy scalar
    train_one_step(engine)
else:
    print("restored", engine.restored_from, repr(engine.client_state))
"""


def test_a_snapshot_refuses_a_state_updated_in_place_and_restores_the_last_good_one(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SNAPSHOT_JOB)
    shm_dir = str(tmp_path / "shm")

    def run(phase: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), phase, shm_dir],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": ROOT},
        )

    trained = run("train")
    assert trained.returncode == 1
    errors = [line for line in trained.stderr.splitlines() if line.startswith("ValueError")]
    assert errors == [
        "ValueError: engine.set_client_state: client_state['position']: a numpy.int64 cannot be restored from a "
        f"snapshot or checkpoint; store {ALLOWED}"
    ], trained.stderr[-3000:]
    restored = run("restore")
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert restored.stdout.strip() == f"restored 2 {EVERY_KIND!r}"
