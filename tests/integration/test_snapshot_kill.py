"""kill -9 of workers, of the agent and of the whole launcher while the example trains with
snapshots: every job resumes and ends bit-identical to an uninterrupted run, having redone at most
one snapshot interval of steps, and leaves no agent and no shared memory behind."""

import os
import random
import shutil
import time

import pytest

from memfit.checkpointing import verify_checkpoint
from tests.integration.snapshot_job import (
    INTERVAL,
    MAX_STEPS,
    Job,
    assert_cleaned_up,
    check_against,
    new_shm_dir,
    read_metrics,
    write_config,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    shm_dir = new_shm_dir()
    metrics = str(directory / "metrics.jsonl")
    job = Job(str(directory), write_config(str(directory)), shm_dir, metrics)
    assert job.wait() == 0, job.output()[-3000:]
    assert_cleaned_up(shm_dir)
    records = read_metrics(metrics)
    assert not any("restored_from" in record for record in records)
    return records


def run_with_fault(tmp_path, fault, persist=False, launcher="memfit run", zero=None):
    shm_dir = new_shm_dir()
    persist_path = str(tmp_path / "persist") if persist else None
    metrics = str(tmp_path / "metrics.jsonl")
    config = write_config(str(tmp_path), persist_path, zero=zero)
    job = Job(str(tmp_path), config, shm_dir, metrics, fault=fault, launcher=launcher)
    status = job.wait()
    assert status == 0, job.output()[-3000:]
    assert_cleaned_up(shm_dir)
    return read_metrics(metrics), job.output(), persist_path


PHASES = {
    "mid-copy": "snapshot-copying:3:1:0",  # rank 1 dies copying its 3rd snapshot: the 2nd is taken
    "after-commit": "snapshot-committed:2:0:0",  # rank 0 dies right after committing its 2nd
    "mid-step": "snapshot-barrier:6:1:0",  # rank 1 dies entering its 6th optimizer step
    "mid-persist": "snapshot-persist-requested:1:0:0",  # rank 0 dies while the agent persists
    # rank 0 dies as the script logs the last step: after its snapshot, before its metrics line
    "before-last-line": f"script-metrics:{MAX_STEPS}:0:0",
}


FAST_TIER_PHASE = "mid-copy"


@pytest.mark.parametrize(
    "phase",
    [pytest.param(phase, marks=[] if phase == FAST_TIER_PHASE else pytest.mark.slow) for phase in sorted(PHASES)],
)
def test_worker_killed_at_a_phase_resumes_bit_identical(tmp_path, reference, phase):
    records, output, persist_path = run_with_fault(tmp_path, PHASES[phase], persist=phase == "mid-persist")
    restored = check_against(records, reference)
    assert restored, "the job was not restored from a snapshot"
    assert "from shared memory" in output
    if persist_path:
        for name in os.listdir(persist_path):
            if name.startswith("global_step"):
                assert verify_checkpoint(os.path.join(persist_path, name)) == []


def test_stage3_with_parameters_on_nvme_resumes_bit_identical(tmp_path, reference):
    """ZeRO stage 3, every tensor gathered and resting in each rank's parameter swap file: rank 1
    is killed entering its 6th step; the job resumes from the snapshot and ends as the stage-2 run
    that was never interrupted (stage 3 computes the same bits)."""
    swap = tmp_path / "swap"
    swap.mkdir()
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "offload_param": {"device": "nvme", "nvme_path": str(swap)},
    }
    records, output, _ = run_with_fault(tmp_path, PHASES["mid-step"], zero=zero)
    assert check_against(records, reference), "the job was not restored from a snapshot"
    assert not [name for name in os.listdir(swap) if name.endswith(".swap")]  # removed at exit


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_everything_on_nvme_resumes_bit_identical(tmp_path, nproc):
    """Stage 3 with parameters and optimizer state on NVMe (on one rank the step streams, and a
    snapshot step reads the owned tensors whole): a worker killed entering its 6th step resumes
    and ends as the uninterrupted run with the same config."""
    swap = tmp_path / "swap"
    swap.mkdir()
    nvme = {"device": "nvme", "nvme_path": str(swap)}
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "offload_param": nvme, "offload_optimizer": nvme}
    config = write_config(str(tmp_path), zero=zero)
    reference_metrics = str(tmp_path / "reference.jsonl")
    job = Job(str(tmp_path), config, new_shm_dir(), reference_metrics, nproc=nproc)
    assert job.wait() == 0, job.output()[-3000:]
    shm_dir, metrics = new_shm_dir(), str(tmp_path / "metrics.jsonl")
    job = Job(str(tmp_path), config, shm_dir, metrics, fault=f"snapshot-barrier:6:{nproc - 1}:0", nproc=nproc)
    assert job.wait() == 0, job.output()[-3000:]
    assert_cleaned_up(shm_dir)
    assert check_against(read_metrics(metrics), read_metrics(reference_metrics)), "not restored from a snapshot"


@pytest.mark.slow
def test_offloaded_optimizer_state_is_snapshotted(tmp_path):
    """Under offload_optimizer "cpu" the masters and moments live in the host arena: the snapshot
    copies them too, and a killed job ends as an uninterrupted one with the same config."""
    reference_metrics = str(tmp_path / "reference.jsonl")
    job = Job(str(tmp_path), write_config(str(tmp_path), offload=True), new_shm_dir(), reference_metrics)
    assert job.wait() == 0, job.output()[-3000:]
    shm_dir = new_shm_dir()
    metrics = str(tmp_path / "metrics.jsonl")
    config = write_config(str(tmp_path), offload=True)
    job = Job(str(tmp_path), config, shm_dir, metrics, fault=PHASES["mid-copy"])
    assert job.wait() == 0, job.output()[-3000:]
    assert_cleaned_up(shm_dir)
    assert check_against(read_metrics(metrics), read_metrics(reference_metrics))


@pytest.mark.slow
def test_under_plain_torchrun_the_first_worker_starts_the_agent(tmp_path, reference):
    records, output, _ = run_with_fault(tmp_path, PHASES["mid-copy"], launcher="torchrun")
    assert check_against(records, reference)
    assert output.count("holding snapshots in") == 1  # one agent for both ranks and both attempts


@pytest.mark.slow
def test_agent_killed_mid_persist_is_replaced(tmp_path, reference):
    """The agent dies writing a persisted snapshot: the workers fail at their next snapshot, torchrun
    restarts them, they start a new agent and restore from the slots the dead agent left."""
    records, output, persist_path = run_with_fault(tmp_path, "snapshot-persisting:1:*:0", persist=True)
    assert check_against(records, reference)
    for name in os.listdir(persist_path):
        if name.startswith("global_step"):
            assert verify_checkpoint(os.path.join(persist_path, name)) == []


def steps_done(metrics: str) -> int:
    try:
        return max((record["step"] for record in read_metrics(metrics)), default=0)
    except (FileNotFoundError, ValueError):  # not written yet, or a line half written
        return 0


def random_kill_trials(tmp_path, reference, num_trials: int) -> None:
    """Each trial SIGKILLs a random worker of a fresh job at a random moment (after a random step,
    plus up to a second); the job resumes and ends bit-identical to the shared uninterrupted run.
    Trial k draws from seed + k, so MEMFIT_TEST_SEED=<the seed printed> repeats the trials."""
    seed = int(os.environ.get("MEMFIT_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"random kills: seed {seed} (MEMFIT_TEST_SEED={seed} repeats them)")
    for trial in range(num_trials):
        rng = random.Random(seed + trial)
        after_step, delay_s, victim_rank = rng.randint(1, MAX_STEPS - 2), rng.uniform(0.0, 1.0), rng.randrange(2)
        print(f"trial {trial}: worker of local rank {victim_rank} killed {delay_s:.2f} s after step {after_step}")
        directory = tmp_path / f"trial{trial}"
        directory.mkdir()
        shm_dir = new_shm_dir()
        metrics = str(directory / "metrics.jsonl")
        job = Job(str(directory), write_config(str(directory)), shm_dir, metrics)
        deadline = time.monotonic() + 240
        while steps_done(metrics) < after_step and job.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay_s)
        workers = sorted(job.workers(), key=lambda process: process.pid)  # spawned in local-rank order
        assert len(workers) == 2, f"trial {trial} of seed {seed}: workers {workers}\n" + job.output()[-3000:]
        workers[victim_rank].kill()
        assert job.wait() == 0, f"trial {trial} of seed {seed}:\n" + job.output()[-3000:]
        assert_cleaned_up(shm_dir)
        check_against(read_metrics(metrics), reference)


@pytest.mark.slow  # the fast tier kills a worker at a chosen phase (above)
@pytest.mark.timeout(1500)
def test_random_kills_of_random_workers_full_count(tmp_path, reference):
    random_kill_trials(tmp_path, reference, num_trials=15)


@pytest.mark.slow
@pytest.mark.parametrize("keep_shm", [False, True])
def test_launcher_killed_then_relaunched(tmp_path, reference, keep_shm):
    """The whole launcher and its workers are killed: the agent sees the launcher gone and exits.
    The relaunched job restores from the slots when they were kept, else from disk."""
    shm_dir = new_shm_dir()
    persist_path = str(tmp_path / "persist")
    config = write_config(str(tmp_path), persist_path, every_snapshots=1, keep_shm=keep_shm)
    metrics = str(tmp_path / "metrics.jsonl")
    job = Job(str(tmp_path), config, shm_dir, metrics)
    deadline = time.monotonic() + 120
    while not (os.path.exists(metrics) and len(read_metrics(metrics)) >= 3 * INTERVAL + 1):
        assert time.monotonic() < deadline and job.process.poll() is None, job.output()[-3000:]
        time.sleep(0.1)
    job.kill_launcher_and_workers()
    assert_cleaned_up(shm_dir, keep_shm=keep_shm)
    relaunched = Job(str(tmp_path), config, shm_dir, metrics)
    assert relaunched.wait() == 0, relaunched.output()[-3000:]
    assert_cleaned_up(shm_dir, keep_shm=keep_shm)
    assert ("from shared memory" if keep_shm else "from disk") in relaunched.output()
    assert check_against(read_metrics(metrics), reference)
    if keep_shm:
        shutil.rmtree(shm_dir)
