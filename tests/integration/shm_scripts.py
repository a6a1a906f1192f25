"""Helpers for the job-isolation tests: a one-process memfit job as a user writes it (a script that
calls memfit.initialize and trains a few steps), run in a subprocess, optionally as another user."""

import json
import os
import subprocess
import sys
import time

from tests.integration.snapshot_job import ROOT, agents_of

OTHER_UID = 54321  # a user that owns nothing on this machine

TRAIN_SCRIPT = """
import json, logging, sys, torch, memfit
logging.basicConfig(level=logging.INFO)
config, steps, report = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
engine = memfit.initialize(torch.nn.Linear(4, 4), config)
restored = engine.restored_from
for _ in range(steps):
    engine.backward(engine(torch.ones(2, 4)).square().mean())
    engine.step()
engine.snapshotter.join_copy()
state = {"restored_from": restored, "step": engine.global_step, "lr": engine.optimizer.param_groups[0]["lr"],
         "weight_decay": engine.optimizer.param_groups[0]["weight_decay"]}
open(report, "w").write(json.dumps(state))
"""


def config_with(snapshot: dict, lr: float = 0.003, optimizer: str = "AdamW") -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": optimizer, "params": {"lr": lr, "weight_decay": 0.1}},
        "snapshot": {"interval_steps": 1, **snapshot},
    }


def environment(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in (
        "MEMFIT_SNAPSHOT_SHM_DIR",
        "MEMFIT_JOB_ID",
        "TORCHELASTIC_RUN_ID",
        "MEMFIT_LAUNCHER_PID",
        "WORLD_SIZE",
    ):
        env.pop(name, None)
    env.update(extra)
    return env


def train(tmp_path, config: dict, steps: int = 2, **env) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs TRAIN_SCRIPT; (the finished process, its report or {} when it failed)."""
    report = os.path.join(tmp_path, f"report-{time.monotonic_ns()}.json")
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, json.dumps(config), str(steps), report],
        capture_output=True,
        text=True,
        env=environment(**env),
        timeout=120,
    )
    return done, (json.load(open(report)) if os.path.exists(report) else {})


def last_line(done: subprocess.CompletedProcess) -> str:
    """The error line the job ended with (the agent may log its exit after it)."""
    lines = [line for line in done.stderr.splitlines() if "Error: " in line]
    return lines[-1] if lines else ""


def wait_for_agents_to_exit(shm_dir: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while agents_of(shm_dir):
        assert time.monotonic() < deadline, f"the snapshot agent of {shm_dir} did not exit"
        time.sleep(0.1)
