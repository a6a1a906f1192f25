"""Snapshot storage going wrong, with real files and real mounts: a flipped byte in a slot or in a
persisted file (the previous good copy is restored, `memfit snapshot verify` exits 2), a tmpfs too
small for the slots (a clear error at start), a full disk while persisting (an error in the log,
training goes on, the previous persisted snapshot stays whole)."""

import os
import shutil
import subprocess
import sys

import pytest

from memfit.checkpointing import verify_checkpoint
from memfit.checkpointing.slots import SlotReader, layout
from tests.integration.snapshot_job import (
    INTERVAL,
    MAX_STEPS,
    ROOT,
    Job,
    assert_cleaned_up,
    check_against,
    new_shm_dir,
    read_metrics,
    write_config,
)


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a tmpfs of the given size; unmounted at the end."""
    mounted = []

    def mount(name: str, size: str) -> str:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(str(point))
        return str(point)

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", point], check=False)


def memfit_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "memfit.launcher.cli", *args], capture_output=True, text=True, env=env)


def run_job(tmp_path, config, shm_dir, metrics) -> Job:
    job = Job(str(tmp_path), config, shm_dir, metrics)
    assert job.wait() == 0, job.output()[-3000:]
    return job


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x10]))


@pytest.mark.slow
def test_flipped_byte_in_a_slot_restores_the_previous_snapshot(tmp_path):
    reference_metrics = str(tmp_path / "reference.jsonl")
    reference_shm = new_shm_dir()
    run_job(tmp_path, write_config(str(tmp_path)), reference_shm, reference_metrics)
    assert_cleaned_up(reference_shm)

    shm_dir = new_shm_dir()
    metrics = str(tmp_path / "metrics.jsonl")
    config = write_config(str(tmp_path), keep_shm=True)
    try:
        run_job(tmp_path, config, shm_dir, metrics)
        assert_cleaned_up(shm_dir, keep_shm=True)
        newest = max((SlotReader(os.path.join(shm_dir, f"rank1.slot{slot}")) for slot in (0, 1)), key=lambda r: r.step)
        assert newest.step == MAX_STEPS
        placed = {path: offset for path, _, offset in layout(newest.payload())[0]}
        tensor_path = next(path for path in placed if path.startswith("optimizer_state/"))
        flip_byte(newest.path, placed[tensor_path] + 3)

        verify = memfit_cli("snapshot", "verify", shm_dir)
        assert verify.returncode == 2, verify
        assert newest.path in verify.stderr and tensor_path in verify.stderr

        relaunched = run_job(tmp_path, config, shm_dir, metrics)
        assert f"restored the snapshot of step {MAX_STEPS - INTERVAL} from shared memory" in relaunched.output()
        check_against(read_metrics(metrics), read_metrics(reference_metrics))
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


@pytest.mark.slow
def test_flipped_byte_in_a_persisted_file_restores_the_previous_one(tmp_path):
    persist = str(tmp_path / "persist")
    config = write_config(str(tmp_path), persist, every_snapshots=1)
    reference_metrics = str(tmp_path / "reference.jsonl")
    run_job(tmp_path, write_config(str(tmp_path)), new_shm_dir(), reference_metrics)

    shm_dir = new_shm_dir()
    metrics = str(tmp_path / "metrics.jsonl")
    run_job(tmp_path, config, shm_dir, metrics)
    assert_cleaned_up(shm_dir)
    newest = os.path.join(persist, f"global_step{MAX_STEPS}")
    assert verify_checkpoint(newest) == []
    rank_file = os.path.join(newest, "rank0.pt")
    flip_byte(rank_file, os.path.getsize(rank_file) // 2)

    verify = memfit_cli("snapshot", "verify", persist)
    assert verify.returncode == 2 and rank_file in verify.stderr, verify

    relaunched = run_job(tmp_path, config, shm_dir, metrics)  # the slots are gone: from disk
    output = relaunched.output()
    assert f"global_step{MAX_STEPS} skipped" in output and "checksum mismatch" in output
    assert f"restored the snapshot of step {MAX_STEPS - INTERVAL} from disk" in output
    check_against(read_metrics(metrics), read_metrics(reference_metrics))


def test_tmpfs_too_small_fails_at_start_naming_the_bytes(tmp_path, tmpfs):
    small = tmpfs("small", "1m")
    script = (
        "import torch, memfit\n"
        "model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))\n"
        "memfit.initialize(model, {'train_micro_batch_size_per_gpu': 1, "
        f"'snapshot': {{'interval_steps': 1, 'shm_dir': '{small}/job'}}}})\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MEMFIT_SNAPSHOT_SHM_DIR", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    line = next(line for line in done.stderr.splitlines() if line.startswith("memfit.checkpointing.agent.AgentError"))
    assert "need" in line and "bytes free" in line and f"{small}/job" in line, done.stderr[-2000:]
    assert_cleaned_up(f"{small}/job")


@pytest.mark.slow
def test_disk_full_while_persisting_keeps_training_and_the_previous_snapshot(tmp_path, tmpfs):
    persist = tmpfs("persist", "16m")  # one persisted snapshot of the example fits, two do not
    reference_metrics = str(tmp_path / "reference.jsonl")
    run_job(tmp_path, write_config(str(tmp_path)), new_shm_dir(), reference_metrics)

    shm_dir = new_shm_dir()
    metrics = str(tmp_path / "metrics.jsonl")
    job = run_job(tmp_path, write_config(str(tmp_path), persist, every_snapshots=1), shm_dir, metrics)
    assert_cleaned_up(shm_dir)
    output = job.output()
    assert f"persisting the snapshot of step {2 * INTERVAL} failed" in output and "ENOSPC" in output
    check_against(read_metrics(metrics), read_metrics(reference_metrics))
    assert open(os.path.join(persist, "latest")).read() == f"global_step{INTERVAL}"
    assert verify_checkpoint(os.path.join(persist, f"global_step{INTERVAL}")) == []
    assert not [name for name in os.listdir(persist) if name.startswith(".tmp")]
