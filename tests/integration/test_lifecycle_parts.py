"""The pieces behind the lifecycle tests, each on its own and fast: the launcher-ancestry check (in
a real child process), the heartbeat over a real TCPStore, which errors count as timeouts, the
config key, and which --config values `memfit run` checks."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from memfit.config import ConfigError, load_config
from memfit.launcher.run import build_parser, config_paths, fixed_world_size
from memfit.runtime.distributed import init_distributed
from memfit.runtime.heartbeat import Heartbeat, interval_for
from memfit.runtime.lifecycle import is_timeout

ARM = "from memfit.runtime.lifecycle import exit_with_launcher; exit_with_launcher(); print('still running')"


def run_worker(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def a_pid_that_is_not_an_ancestor() -> int:
    sleeper = subprocess.Popen(["sleep", "30"])
    sleeper.kill()
    sleeper.wait()
    return sleeper.pid


def test_a_worker_whose_launcher_is_gone_exits_when_it_joins():
    result = run_worker(
        ARM, TORCHELASTIC_RUN_ID="job", RANK="3", MEMFIT_LAUNCHER_PID=str(a_pid_that_is_not_an_ancestor())
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "memfit: rank 3: its launcher (pid " in result.stderr
    assert "exited before the worker joined the job; exiting" in result.stderr


def test_a_worker_whose_launcher_is_an_ancestor_keeps_running():
    """The launcher need not be the direct parent (here the shell between them is not it)."""
    result = subprocess.run(
        ["sh", "-c", f'{sys.executable} -c "{ARM}"; true'],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TORCHELASTIC_RUN_ID": "job", "MEMFIT_LAUNCHER_PID": str(os.getpid())},
    )
    assert result.stdout.strip() == "still running", result.stderr


def test_a_malformed_launcher_pid_is_a_clear_error():
    result = run_worker(ARM, TORCHELASTIC_RUN_ID="job", MEMFIT_LAUNCHER_PID="launcher")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ValueError: MEMFIT_LAUNCHER_PID: expected the launcher's process id, got 'launcher'"
    )


@pytest.mark.parametrize(
    "env",
    [
        {"MEMFIT_EXIT_WITH_LAUNCHER": "0", "TORCHELASTIC_RUN_ID": "job"},  # opted out
        {},  # not started by a launcher: a plain `python train.py`
    ],
)
def test_the_launcher_check_is_skipped_when_it_does_not_apply(env):
    env = {**env, "MEMFIT_LAUNCHER_PID": str(a_pid_that_is_not_an_ancestor())} if env else {}
    clean = {
        key: value for key, value in os.environ.items() if key not in ("TORCHELASTIC_RUN_ID", "MEMFIT_LAUNCHER_PID")
    }
    result = subprocess.run(
        [sys.executable, "-c", ARM], capture_output=True, text=True, timeout=60, env={**clean, **env}
    )
    assert result.returncode == 0 and result.stdout.strip() == "still running", result.stderr


def test_the_parent_death_signal_kills_a_worker_whose_launcher_dies():
    """A launcher stand-in starts the worker and is killed; the worker must die with it."""
    code = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", {ARM + "; import time; time.sleep(60)"!r}],
                                  env={{**os.environ, "TORCHELASTIC_RUN_ID": "job", "MEMFIT_LAUNCHER_PID": str(os.getpid())}},
                                  stdout=subprocess.PIPE, start_new_session=True)
        worker.stdout.readline()  # armed
        print(worker.pid, flush=True)
        time.sleep(60)
        """
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker_pid = int(launcher.stdout.readline())
    try:
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _is_gone(worker_pid):
            time.sleep(0.05)
        assert _is_gone(worker_pid)
    finally:
        if not _is_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _is_gone(pid: int) -> bool:
    """Exited; a zombie counts, since whatever adopted the orphan reaps it, not this test."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
def store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    yield dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
    del server


def test_heartbeat_names_the_ranks_that_stopped(store):
    beats = [Heartbeat(store, rank, 3, interval_s=0.1) for rank in range(3)]
    assert beats[0].silent_ranks() == []
    beats[2].stop()
    assert beats[0].silent_ranks() == [2]
    assert beats[1].explain_timeout(3.0) == (
        "collective timed out after 3 s (collective_timeout_s); rank 2 stopped answering (no heartbeat in 0.4 s)"
    )
    beats[1].stop()
    assert beats[0].explain_timeout(None) == (
        "collective timed out; ranks 1, 2 stopped answering (no heartbeat in 0.4 s)"
    )
    beats[0].stop()


def test_heartbeat_says_when_every_rank_is_alive(store):
    beats = [Heartbeat(store, rank, 2, interval_s=0.1) for rank in range(2)]
    assert beats[0].explain_timeout(5.0) == (
        "collective timed out after 5 s (collective_timeout_s); every rank is still alive: one is slower than the "
        "timeout, or they called different collectives"
    )
    for beat in beats:
        beat.stop()


def test_heartbeat_interval_and_misuse(store):
    assert interval_for(3) == 0.5 and interval_for(30) == 3 and interval_for(1800) == 5
    with pytest.raises(ValueError, match="interval_s: must be positive, got 0"):
        Heartbeat(store, 0, 1, interval_s=0)


@pytest.mark.parametrize(
    "error, expected",
    [
        (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation"), True),
        (RuntimeError("Application timeout caused pair closure"), True),
        (RuntimeError("wait timeout after 3000ms, keys: /memfit"), True),
        (RuntimeError("Connection reset by peer"), False),
        (ValueError("timed out"), False),  # not an error torch raises for a collective
        (KeyboardInterrupt(), False),
    ],
)
def test_which_errors_count_as_timeouts(error, expected):
    assert is_timeout(error) is expected


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "expected a number from 1 to 2592000, got 0"),
        (0.5, "expected a number from 1 to 2592000, got 0.5"),
        (-1, "expected a number from 1 to 2592000, got -1"),
        (2592001, "expected a number from 1 to 2592000, got 2592001"),
        ("30m", 'expected a number, got "30m"'),
        (None, "expected a number, got null"),
    ],
)
def test_collective_timeout_config_key_rejects_bad_values(value, message):
    with pytest.raises(ConfigError) as caught:
        load_config({"train_micro_batch_size_per_gpu": 1, "collective_timeout_s": value})
    assert caught.value.problems == [f"collective_timeout_s: {message}"]


def test_collective_timeout_default_and_init_distributed_misuse():
    assert load_config({"train_micro_batch_size_per_gpu": 1}).collective_timeout_s == 1800
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="collective_timeout_s: must be positive"):
            init_distributed(collective_timeout_s=bad)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config", "a.json", "train.py"], ["a.json"]),
        (["train.py", "--config", "a.json"], ["a.json"]),
        (["train.py", "--config=a.json", "--lr", "1"], ["a.json"]),
        (["--config", "a.json", "train.py", "--config", "a.json"], ["a.json"]),
        (["--config", "a.json", "train.py", "--config", "b.json"], ["a.json", "b.json"]),
        (["train.py", "--config", "model.yaml"], []),  # the script's own option, not a memfit config
        (["train.py", "--config"], []),  # no value: the script reports that
        (["train.py"], []),
    ],
)
def test_which_configs_memfit_run_checks(argv, expected):
    assert config_paths(build_parser().parse_args(argv)) == expected


@pytest.mark.parametrize(
    "launch, expected",
    [
        (["--nproc-per-node", "3"], 3),
        (["--nnodes", "2:2", "--nproc-per-node", "4"], 8),
        (["--nnodes", "1:4", "--nproc-per-node", "2"], None),  # elastic: the world size is not known yet
        (["--nproc-per-node", "gpu"], None),  # no GPU here: torchrun reports that itself
    ],
)
def test_the_world_size_memfit_run_checks_the_batch_against(launch, expected):
    import torch

    if launch[-1] == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert fixed_world_size(build_parser().parse_args(launch + ["train.py"])) == expected
