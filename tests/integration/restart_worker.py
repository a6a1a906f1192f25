"""A 2-rank job for the restart tests: on the first attempt rank 1 kills itself with SIGKILL after
the process group is up; on the next attempt rank 0 joins late, so rank 1 reads the store first
(where the keys of the first attempt still are, unless each attempt has its own)."""

import os
import signal
import sys
import time

import torch

import memfit

restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
rank = int(os.environ["RANK"])
if restart_count == 1 and rank == 0:
    time.sleep(2.0)
engine = memfit.initialize(
    torch.nn.Linear(4, 4), {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
)
if restart_count == 0 and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
for _ in range(3):
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()
print(f"finished rank {rank} attempt {restart_count}", flush=True)
sys.exit(0)
