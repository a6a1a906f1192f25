"""torchrun --max-restarts and memfit run --max-restarts: after a worker is killed with SIGKILL the
restarted workers join a fresh process group and the job finishes (torch 2.13 keeps one agent
store across restarts, so the keys of the killed attempt would otherwise be read as current)."""

import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "restart_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHERS = {
    "memfit run": [sys.executable, "-m", "memfit.launcher.cli", "run"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_restarted_workers_finish_after_a_sigkill(launcher):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = LAUNCHERS[launcher] + ["--nproc-per-node", "2", "--max-restarts", "1", WORKER]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished rank 0 attempt 1" in done.stdout and "finished rank 1 attempt 1" in done.stdout
    assert "connectFullMesh failed" not in done.stderr
