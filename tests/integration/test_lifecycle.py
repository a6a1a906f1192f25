"""Worker lifetime with real launchers, real workers and real signals: workers die with their
launcher (memfit run and plain torchrun, also when the launcher dies before the worker reaches
memfit.initialize), a stopped rank fails the job after collective_timeout_s and is named, and
Ctrl-C ends the job with one line and exit status 130."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lifecycle_worker.py")
CONFIG = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
LAUNCHERS = {
    "memfit run": [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "2"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
}


def is_alive(pid: int) -> bool:
    """False for a zombie too: an orphan is reaped by whatever adopted it, not by this test."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


class Job:
    """A 2-rank job of lifecycle_worker.py in its own session, as a shell starts it; on exit,
    everything it started is killed whatever the test did."""

    def __init__(self, tmp_path, launcher: str, config: dict | None = None, worker_args=()):
        self.pid_dir = tmp_path / "pids"
        self.pid_dir.mkdir()
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config or CONFIG))
        self.stderr_path = tmp_path / "stderr.txt"
        self.command = LAUNCHERS[launcher] + [
            WORKER,
            "--config",
            str(config_path),
            "--pid-dir",
            str(self.pid_dir),
            *worker_args,
        ]

    def __enter__(self):
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            self.command,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
            cwd=self.pid_dir.parent,
        )
        return self

    def pids(self, stage: str) -> list[int]:
        """The pid of each rank once both have reached stage (started or training)."""
        paths = [self.pid_dir / f"{stage}.{rank}" for rank in range(2)]
        wait_until(lambda: all(p.exists() for p in paths) or self.proc.poll() is not None, 120, f"both ranks {stage}")
        assert self.proc.poll() is None, self.stderr()
        return [int(p.read_text()) for p in paths]

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def __exit__(self, *exc):
        for path in self.pid_dir.iterdir():
            if not path.name.endswith(".tmp") and is_alive(pid := int(path.read_text())):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._stderr.close()


@pytest.mark.parametrize("launcher", ["memfit run", "torchrun"])
def test_workers_exit_when_the_launcher_is_killed(tmp_path, launcher):
    with Job(tmp_path, launcher) as job:
        workers = job.pids("training")
        os.kill(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
        wait_until(lambda: not any(is_alive(pid) for pid in workers), 10, f"workers {workers} exit")


@pytest.mark.parametrize("launcher", ["memfit run", "torchrun"])
def test_workers_exit_when_the_launcher_died_before_initialize(tmp_path, launcher):
    """The launcher dies while the workers have imported memfit but not yet joined the group: the
    parent-death signal is not armed yet, so initialize must notice on its own."""
    with Job(tmp_path, launcher, worker_args=["--sleep-before-init", "3"]) as job:
        workers = job.pids("started")
        os.kill(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
        wait_until(lambda: not any(is_alive(pid) for pid in workers), 3 + 10, f"workers {workers} exit")
        assert not list(job.pid_dir.glob("training.*"))


@pytest.mark.slow
@pytest.mark.parametrize("stopped_rank", [1, 0])
def test_a_stopped_rank_fails_the_job_after_the_collective_timeout_and_is_named(tmp_path, stopped_rank):
    config = {**CONFIG, "collective_timeout_s": 3}
    with Job(tmp_path, "memfit run", config) as job:
        workers = job.pids("training")
        time.sleep(0.5)
        os.kill(workers[stopped_rank], signal.SIGSTOP)
        stopped_at = time.monotonic()
        returncode = job.proc.wait(timeout=150)
        elapsed_s = time.monotonic() - stopped_at
        stderr = job.stderr()
    healthy_rank = 1 - stopped_rank
    assert returncode == 1, stderr[-3000:]
    # the healthy rank says who it waited for, and so does the launcher's summary
    assert f"memfit: rank {healthy_rank}: collective timed out after 3 s (collective_timeout_s)" in stderr
    summary = [line for line in stderr.splitlines() if line.startswith("memfit run: ")]
    assert summary[0].startswith(f"memfit run: rank {healthy_rank} failed first"), stderr[-3000:]
    assert f"rank {stopped_rank} stopped answering" in summary[0]
    # torchrun waits 30 s for the stopped process to honour SIGTERM before it sends SIGKILL
    assert elapsed_s < 3 + 30 + 20


def test_collective_timeout_s_reaches_the_group_through_initialize(tmp_path):
    """The config's collective_timeout_s, given only to memfit.initialize (through `memfit run`),
    bounds the wait for a stopped rank: without it the group waits its 30 minute default. Once the
    healthy rank has failed, naming the stopped one, and exited, the stopped rank is resumed so that torchrun's
    30 s grace before it SIGKILLs a process that ignores SIGTERM does not lengthen the test (the
    slow test above waits it out)."""
    config = {**CONFIG, "collective_timeout_s": 3}
    with Job(tmp_path, "memfit run", config) as job:
        workers = job.pids("training")
        os.kill(workers[1], signal.SIGSTOP)
        named = "memfit: rank 0: collective timed out after 3 s (collective_timeout_s); rank 1 stopped answering"
        wait_until(lambda: named in job.stderr(), 3 + 20, "rank 0 names the stopped rank")
        wait_until(lambda: not is_alive(workers[0]), 20, "rank 0 exits")  # its error file is written
        os.kill(workers[1], signal.SIGCONT)
        returncode = job.proc.wait(timeout=60)
        stderr = job.stderr()
    assert returncode == 1, stderr[-3000:]
    summary = [line for line in stderr.splitlines() if line.startswith("memfit run: ")]
    assert summary[0].startswith("memfit run: rank 0 failed first"), stderr[-3000:]
    assert "collective timed out after 3 s (collective_timeout_s); rank 1 stopped answering" in summary[0]


FAILING_SCRIPT = """
import torch

import memfit

engine = memfit.initialize(torch.nn.Linear(2, 2), {"train_micro_batch_size_per_gpu": 1})
raise FileNotFoundError("shard-7.bin: no such data shard")
"""


def test_a_one_rank_job_summary_quotes_its_error(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FAILING_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "1", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    summary = [line for line in result.stderr.splitlines() if line.startswith("memfit run: ")]
    assert len(summary) == 1, result.stderr[-3000:]
    assert re.fullmatch(
        r"memfit run: rank 0 failed first \(exit code 1, pid \d+\): FileNotFoundError: shard-7.bin: no such data shard",
        summary[0],
    ), summary


def test_ctrl_c_ends_the_job_with_one_line_and_status_130(tmp_path):
    with Job(tmp_path, "memfit run") as job:
        workers = job.pids("training")
        already_written = len(job.stderr())
        os.killpg(job.proc.pid, signal.SIGINT)  # what a terminal does: workers run in their own sessions
        returncode = job.proc.wait(timeout=60)
        after_interrupt = job.stderr()[already_written:]
    assert returncode == 130
    assert after_interrupt.splitlines() == ["memfit run: interrupted (Ctrl-C); workers stopped"]
    assert not any(is_alive(pid) for pid in workers)
