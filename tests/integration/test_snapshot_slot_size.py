"""The slots reserved at the start hold every snapshot that follows: the reservation counts all
the state the optimizer will create (Adam with amsgrad keeps a third moment), so a tmpfs too small
for it fails the start naming the bytes, instead of the first snapshot failing and every restart
after it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

JOB = """
import os
import sys

import torch

import memfit

shm_dir = sys.argv[1]
model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
config = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "Adam", "params": {"amsgrad": True}},
    "snapshot": {"interval_steps": 1, "shm_dir": shm_dir},
}
engine = memfit.initialize(model, config)


def slot_sizes():
    return sorted((name, os.path.getsize(os.path.join(shm_dir, name))) for name in os.listdir(shm_dir) if "slot" in name)


print("reserved", slot_sizes(), flush=True)
for _ in range(2):
    engine.backward(engine(torch.ones(1, 512)).sum())
    engine.step()
engine.snapshotter.join_copy()
print("after 2 snapshots", slot_sizes(), flush=True)
"""


def run_job(tmp_path, shm_dir: str) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MEMFIT_SNAPSHOT_SHM_DIR", None)
    return subprocess.run([sys.executable, str(script), shm_dir], capture_output=True, text=True, env=env, timeout=120)


def test_amsgrad_slots_reserved_at_start_are_never_outgrown(tmp_path):
    done = run_job(tmp_path, str(tmp_path / "shm"))
    assert done.returncode == 0, done.stderr[-3000:]
    reserved, after = done.stdout.splitlines()
    assert reserved.removeprefix("reserved ") == after.removeprefix("after 2 snapshots "), done.stdout


@pytest.fixture
def small_tmpfs(tmp_path):
    """16 MiB: room for the two slots of Adam's two moments (2 x 7 MiB), not for amsgrad's three."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield str(point)
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_tmpfs_without_room_for_amsgrad_fails_the_start_naming_the_bytes(tmp_path, small_tmpfs):
    shm_dir = f"{small_tmpfs}/job"
    done = run_job(tmp_path, shm_dir)
    assert done.returncode == 1
    assert "reserved" not in done.stdout  # initialize itself failed
    errors = [line for line in done.stderr.splitlines() if line.startswith("memfit.checkpointing.agent.AgentError")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(
        f"memfit.checkpointing.agent.AgentError: {shm_dir}: snapshot data slots of rank 0 need 18898944 more bytes "
        "(2 x 9449472), 16777216 bytes free"
    ), errors
