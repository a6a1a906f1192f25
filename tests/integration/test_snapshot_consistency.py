"""A snapshot holds the state of the step it was taken at, even when the training state changes
while its lazy copy is still running: load_checkpoint waits for the copy before it overwrites the
parameters and optimizer state the copy is reading."""

import os
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import sys, threading, torch, memfit
from memfit.checkpointing.slots import SlotFile, SlotReader
shm_dir, checkpoint_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
          "snapshot": {"interval_steps": 1, "shm_dir": shm_dir}}
engine = memfit.initialize(model, config)

def step():
    engine.backward(engine(torch.randn(4, 32)).square().mean())
    engine.step()

step()
engine.save_checkpoint(checkpoint_dir)
gate = threading.Event()
copy_tensor = SlotFile.copy_tensor

def gated_copy(self, tensor, offset):
    gate.wait()  # the copy of the step-2 snapshot is slow: it is still running at load_checkpoint
    return copy_tensor(self, tensor, offset)

SlotFile.copy_tensor = gated_copy
step()
at_step_2 = {name: param.detach().clone() for name, param in engine.module.named_parameters()}
threading.Timer(0.5, gate.set).start()
engine.load_checkpoint(checkpoint_dir)
engine.snapshotter.wait_for_copy()
newest = max((SlotReader(f"{shm_dir}/rank0.slot{slot}") for slot in (0, 1)), key=lambda reader: reader.step)
assert newest.step == 2, newest.step
for name, value in at_step_2.items():
    assert torch.equal(newest.tensor(f"params/{name}"), value), f"the step-2 snapshot holds other values of {name}"
print("consistent")
"""


def test_load_checkpoint_waits_for_the_snapshot_copy(tmp_path):
    shm_dir = f"/dev/shm/memfit-test-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, shm_dir, str(tmp_path / "checkpoints")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0 and "consistent" in result.stdout, result.stderr[-3000:]
    deadline = time.monotonic() + 30
    while os.path.exists(shm_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(shm_dir)  # the agent removes the slots once the process has ended
