"""A job restores only its own state: two torchrun jobs with the default rendezvous id running at
once each restore their own snapshot; a snapshot (in shared memory or persisted) of another
configuration is refused at start with what differs and how to start fresh or force it, while a
relaunch with the same configuration (a new job) restores; a forced restore keeps the config's
hyperparameters. Persisted snapshots are private files (0600 in 0700 directories)."""

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.integration.shm_scripts import config_with, environment, last_line, train, wait_for_agents_to_exit

CRASHING_JOB = """
import json, os, sys, time, torch, memfit
tag, directory = sys.argv[1], sys.argv[2]
torch.manual_seed(int(tag == "b"))
config = {"train_micro_batch_size_per_gpu": 2, "seed": 7 if tag == "a" else 8,
          "optimizer": {"type": "AdamW", "params": {"lr": 0.003 if tag == "a" else 1e-4}},
          "snapshot": {"interval_steps": 1}}
engine = memfit.initialize(torch.nn.Linear(4, 4), config)
engine.set_client_state(lambda: {"tag": tag})
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    for _ in range(2):
        engine.backward(engine(torch.ones(2, 4)).square().mean())
        engine.step()
    engine.snapshotter.join_copy()
    open(os.path.join(directory, "ready-" + tag), "w").close()
    other = os.path.join(directory, "ready-" + ("b" if tag == "a" else "a"))
    deadline = time.monotonic() + 120
    while not os.path.exists(other) and time.monotonic() < deadline:  # both jobs hold snapshots now
        time.sleep(0.05)
    os._exit(3)  # torchrun restarts the worker, which restores
report = {"restored_from": engine.restored_from, "client_state": engine.client_state,
          "shm_dir": engine.snapshotter.shm_dir, "lr": engine.optimizer.param_groups[0]["lr"]}
open(os.path.join(directory, "report-" + tag), "w").write(json.dumps(report))
"""


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def test_two_concurrent_torchrun_jobs_with_the_default_rendezvous_id_restore_their_own(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(CRASHING_JOB)
    jobs = {}
    for tag in ("a", "b"):  # no --rdzv-id: torchrun's default "none" for both
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1"]
        command += ["--master-port", str(free_port()), "--max-restarts", "1", str(script), tag, str(tmp_path)]
        log = open(tmp_path / f"log-{tag}", "w")
        jobs[tag] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment())
    for tag, job in jobs.items():
        assert job.wait(timeout=240) == 0, (tmp_path / f"log-{tag}").read_text()[-3000:]
    reports = {tag: json.loads((tmp_path / f"report-{tag}").read_text()) for tag in jobs}
    for tag, report in reports.items():
        assert report["restored_from"] == 2 and report["client_state"] == {"tag": tag}, report
        assert report["lr"] == (0.003 if tag == "a" else 1e-4)
        assert os.path.basename(report["shm_dir"]).startswith("memfit-pid"), report
        wait_for_agents_to_exit(report["shm_dir"])
        assert not os.path.exists(report["shm_dir"])
    assert reports["a"]["shm_dir"] != reports["b"]["shm_dir"]


def test_slots_of_another_configuration_are_refused(tmp_path):
    shm_dir = str(tmp_path / "slots")
    kept = {"shm_dir": shm_dir, "keep_shm": True}
    done, first = train(tmp_path, config_with(kept))
    assert done.returncode == 0 and first["step"] == 2, done.stderr[-2000:]
    wait_for_agents_to_exit(shm_dir)

    done, _ = train(tmp_path, config_with(kept, lr=1e-4))
    line = last_line(done)
    assert done.returncode != 0 and "does not match this job" in line, done.stderr[-2000:]
    assert "optimizer.params.lr 0.003 saved, 0.0001 now" in line
    assert f"To start fresh remove {shm_dir}" in line and "MEMFIT_RESTORE_MISMATCHED=1" in line
    assert f"WARNING:memfit:snapshot slot skipped: {shm_dir}/rank0.slot" in done.stderr  # each one, logged


@pytest.mark.slow
def test_a_relaunch_restores_its_slots_and_a_forced_restore_keeps_the_configs_hyperparameters(tmp_path):
    shm_dir = str(tmp_path / "slots")
    kept = {"shm_dir": shm_dir, "keep_shm": True}
    done, _ = train(tmp_path, config_with(kept))
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for_agents_to_exit(shm_dir)

    done, relaunched = train(tmp_path, config_with(kept))  # a new job, the same configuration
    assert done.returncode == 0, done.stderr[-2000:]
    assert relaunched["restored_from"] == 2 and relaunched["step"] == 4
    wait_for_agents_to_exit(shm_dir)

    done, forced = train(tmp_path, config_with(kept, lr=1e-4), MEMFIT_RESTORE_MISMATCHED="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert forced["restored_from"] == 4 and forced["lr"] == 1e-4 and forced["weight_decay"] == 0.1
    assert "optimizer.params.lr: 0.0001 from the config, not 0.003 from" in done.stderr


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_persisted_snapshot_is_private_and_refused_to_another_optimizer(tmp_path):
    persist_path = str(tmp_path / "persist")
    persist = {"persist": {"path": persist_path, "every_snapshots": 1}}
    shm_dir = str(tmp_path / "slots")
    done, _ = train(tmp_path, config_with({**persist, "shm_dir": shm_dir}))
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for_agents_to_exit(shm_dir)
    tag_dir = os.path.join(persist_path, "global_step2")
    assert mode(persist_path) == 0o700 and mode(tag_dir) == 0o700
    assert {mode(os.path.join(tag_dir, name)) for name in os.listdir(tag_dir)} == {0o600}
    assert mode(os.path.join(persist_path, "latest")) == 0o600

    done, _ = train(tmp_path, config_with({**persist, "shm_dir": str(tmp_path / "other")}, optimizer="SGD"))
    line = last_line(done)
    assert done.returncode != 0 and f"{tag_dir}: the persisted snapshot of step 2" in line, done.stderr[-2000:]
    assert "optimizer AdamW saved, SGD now" in line and "change snapshot.persist.path" in line


HOLDING_JOB = """
import os, sys, time, torch, memfit
engine = memfit.initialize(torch.nn.Linear(4, 4), {"train_micro_batch_size_per_gpu": 2,
                           "snapshot": {"interval_steps": 1, "shm_dir": sys.argv[1]}})
open(sys.argv[2], "w").close()
while not os.path.exists(sys.argv[3]):
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_a_second_job_in_a_directory_whose_job_still_runs_is_refused(tmp_path):
    shm_dir, started, release = str(tmp_path / "slots"), tmp_path / "started", tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDING_JOB, shm_dir, str(started), str(release)], env=environment()
    )
    try:
        while not started.exists():
            assert holder.poll() is None, "the first job failed"
            time.sleep(0.05)
        done, _ = train(tmp_path, config_with({"shm_dir": shm_dir}))
        line = last_line(done)
        assert done.returncode != 0 and f"{shm_dir}: in use by another running job (pid{holder.pid}-" in line, (
            done.stderr[-2000:]
        )
        assert "give this job a snapshot.shm_dir (or MEMFIT_SNAPSHOT_SHM_DIR) of its own" in line
    finally:
        release.touch()
        holder.wait(timeout=60)
