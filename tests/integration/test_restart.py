"""torchrun --max-restarts and memfit run --max-restarts: after a worker is killed with SIGKILL the
restarted workers join a fresh process group and the job finishes (torch 2.13 keeps one agent
store across restarts, so the keys of the killed attempt would otherwise be read as current)."""

import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "restart_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHERS = {
    "memfit run": [sys.executable, "-m", "memfit.launcher.cli", "run"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone"],
}


@pytest.mark.parametrize(
    "launcher",
    [pytest.param(name, marks=[] if name == "memfit run" else pytest.mark.slow) for name in sorted(LAUNCHERS)],
)
def test_restarted_workers_finish_after_a_sigkill(launcher):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = LAUNCHERS[launcher] + ["--nproc-per-node", "2", "--max-restarts", "1", WORKER]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished rank 0 attempt 1" in done.stdout and "finished rank 1 attempt 1" in done.stdout
    assert "connectFullMesh failed" not in done.stderr


@pytest.mark.slow
def test_two_nodes_restart_after_a_sigkill():
    """Two simulated nodes (c10d rendezvous on localhost, one rank each): the node whose worker was
    killed restarts it, the other node restarts its own for the membership change, and both finish."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    nodes = [
        subprocess.Popen(
            LAUNCHERS["memfit run"]
            + ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint"]
            + [f"localhost:{port}", "--nproc-per-node", "1", "--max-restarts", "2", WORKER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
        assert "connectFullMesh failed" not in stderr
    assert "finished rank 0" in outputs[0][0] and "finished rank 1 attempt 1" in outputs[1][0]
