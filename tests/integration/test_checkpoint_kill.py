"""kill -9 at random moments of checkpoint saves (1 and 2 ranks): the newest checkpoint always
loads and verifies, and nothing half-written is ever taken for a checkpoint."""

import os
import random
import subprocess
import sys
import time

import psutil
import pytest
import torch

import memfit
from memfit.checkpointing import verify_checkpoint
from memfit.checkpointing.disk import read_manifest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "save_forever.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(save_dir, world_size, fault=None):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if fault:
        env["MEMFIT_FAULT_AT"] = fault
    if world_size == 1:
        command = [sys.executable, SCRIPT, save_dir]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(world_size),
            SCRIPT,
            save_dir,
        ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )


def kill_tree(process, save_dir):
    """SIGKILL to the launcher and every worker at once (torchrun puts workers in sessions of
    their own, so a process-group kill would miss them): every process whose command line names
    this save directory."""
    victims = [p for p in psutil.process_iter(["cmdline"]) if save_dir in " ".join(p.info["cmdline"] or [])]
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(victims, timeout=30)


def wait_for_first_save(process):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("saved"):
            return
        if not line and process.poll() is not None:
            raise AssertionError("the saving script exited before its first save")
    raise AssertionError("no save within 120 s")


def check_directory(save_dir):
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(".tmp-") or not os.path.isdir(path):
            continue  # an interrupted save: never read
        assert read_manifest(path, quiet=True) is not None, f"{name}: a tag directory without a valid manifest"
        assert verify_checkpoint(path) == [], name


def load_latest(save_dir, tag=None):
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.LayerNorm(1024),
    )
    engine = memfit.initialize(
        model, {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    )
    client = engine.load_checkpoint(save_dir, tag)
    assert client["step"] == engine.global_step
    return engine.global_step


PHASES = [
    "checkpoint-writing",  # inside torch.save of a rank file
    "checkpoint-file-written",  # a rank's file is complete, the others may not be
    "checkpoint-manifest-written",  # manifest in the temporary directory, not yet in place
    "checkpoint-exchanged",  # a re-saved tag swapped in, the old one not yet deleted
    "checkpoint-in-place",  # the new tag is in place, `latest` still names the previous one
    "checkpoint-rotating",  # an old tag hidden, being deleted
]


def run_and_kill(save_dir, world_size, *, fault=None, delay=0.0):
    process = start(save_dir, world_size, fault)
    try:
        if fault is None:
            wait_for_first_save(process)
            time.sleep(delay)
        else:
            process.wait(timeout=300)  # the fault kills one process; torchrun then ends the rest
    finally:
        kill_tree(process, save_dir)


def check_and_load(save_dir):
    check_directory(save_dir)
    assert load_latest(save_dir) >= 1
    assert load_latest(save_dir, "rolling") >= 1


@pytest.mark.parametrize(
    "phase",
    [pytest.param(phase, marks=[] if phase == "checkpoint-in-place" else pytest.mark.slow) for phase in PHASES],
)
def test_kill_at_each_phase_of_a_save(tmp_path, phase):
    world_size = 2 if phase in ("checkpoint-writing", "checkpoint-file-written") else 1
    save_dir = str(tmp_path / "ckpt")
    run_and_kill(save_dir, world_size, fault=f"{phase}:7")  # the 7th time: checkpoints exist already
    assert any(name.startswith(".tmp-") for name in os.listdir(save_dir)) or phase == "checkpoint-in-place"
    check_and_load(save_dir)


@pytest.mark.slow
def test_kill_at_random_moments_of_saves(tmp_path):
    rng = random.Random(0)
    for round_index in range(10):
        save_dir = str(tmp_path / f"round{round_index}")
        run_and_kill(save_dir, 2 if round_index % 3 == 2 else 1, delay=rng.uniform(0.0, 2.0))
        check_and_load(save_dir)
