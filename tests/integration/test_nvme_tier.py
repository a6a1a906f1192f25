"""offload_optimizer "nvme" in one process: bad nvme_path values are refused at initialize with
the path and the bytes; split tensors and every pipeline setting give the host tier's bits; stale
swap files of killed runs are deleted, live ones left alone; a write that fails mid-step (a full
tmpfs: ENOSPC) or an I/O error (a loop device cut under its file system: EIO) stops the run with an OSError naming the swap file and the tensor, and the last
checkpoint stays whole."""

import fcntl
import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

import memfit
from memfit.checkpointing import verify_checkpoint
from memfit.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATH_KEY = "zero_optimization.offload_optimizer.nvme_path"


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # 64 x 64 weights: 4096 elements, split by a 12 KiB ring buffer
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)
    )


OPTIMIZERS = {
    "AdamW": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
    "SGD": {"type": "SGD", "params": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1}},
    "GaLoreAdamW": {"type": "GaLoreAdamW", "params": {"lr": 1e-2, "rank": 4, "update_proj_gap": 2}},
    "FRUGAL": {"type": "FRUGAL", "params": {"lr": 1e-2, "density": 0.5, "update_gap": 2, "proj_type": "blockwise"}},
}


def make_config(device: str, nvme_path=None, bf16: bool = True, optimizer: str = "AdamW", **offload) -> dict:
    section = {"device": device, **({"nvme_path": nvme_path} if nvme_path is not None else {}), **offload}
    return {
        "train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "bf16": {"enabled": bf16},
        "optimizer": OPTIMIZERS[optimizer],
        "zero_optimization": {"stage": 1, "offload_optimizer": section},
    }


def train(engine, steps: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    dtype = next(engine.module.parameters()).dtype
    for _ in range(steps):
        for _ in range(2):
            loss = engine(torch.randn(2, 64, generator=generator).to(dtype)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs directory; unmounted at the end."""
    mounted = []

    def mount(options: str) -> str:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])


# ---- bad input ----------------------------------------------------------------------------------
def initialize_error(nvme_path) -> str:
    with pytest.raises(ConfigError) as caught:
        memfit.initialize(make_model(), make_config("nvme", nvme_path))
    return str(caught.value)


def test_missing_path_is_refused(tmp_path):
    missing = str(tmp_path / "absent")
    assert f"{PATH_KEY}: {missing} does not exist" in initialize_error(missing)


def test_a_path_that_is_not_a_directory_is_refused():
    assert f"{PATH_KEY}: /dev/full is not a directory" in initialize_error("/dev/full")


def test_a_read_only_directory_is_refused(mount_tmpfs):
    path = mount_tmpfs("ro,size=1m")
    assert f"{PATH_KEY}: {path} is not writable (Read-only file system)" in initialize_error(path)


def test_too_little_room_is_refused_with_the_bytes(mount_tmpfs):
    path = mount_tmpfs("size=64k")
    message = initialize_error(path)
    assert f"{PATH_KEY}: {path} has 64.0 KiB free (65536 bytes); the swap files of the ranks on this node need" in (
        message
    )
    assert os.listdir(path) == []  # refused before anything was allocated


def test_nvme_without_a_path_is_refused():
    with pytest.raises(ConfigError, match='nvme_path: required when device is "nvme"'):
        memfit.initialize(make_model(), make_config("nvme"))


# ---- the streamed step --------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize(
    "ring",
    [
        {"buffer_count": 1, "pipeline_read": False},
        {"buffer_count": 2},
        {"buffer_count": 4},
        {"buffer_count": 3, "pipeline_read": False, "pipeline_write": False},
    ],
)
def test_split_tensors_and_every_pipeline_give_the_host_tier_bits(tmp_path, ring, bf16):
    expected = train(memfit.initialize(make_model(), make_config("cpu", bf16=bf16)))
    engine = memfit.initialize(make_model(), make_config("nvme", str(tmp_path), bf16, buffer_size=3 * 4096, **ring))
    assert len(engine._update.groups) > 4  # the 64 x 64 weight alone takes four sub-groups
    got = train(engine)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    report = engine.memory_report()
    assert report["by_tier"]["nvme"] >= report["master_weights"] + report["optimizer_state"]
    from memfit.runtime.estimate import estimate, shapes_of

    planned = estimate(shapes_of(engine.module), engine.config, 1)[0].tiers
    assert planned["nvme"] == report["by_tier"]["nvme"]
    assert planned["host"] == report["by_tier"]["host"]


@pytest.mark.parametrize("optimizer", ["SGD", "GaLoreAdamW", "FRUGAL", "client AdamW"])
@pytest.mark.parametrize("bf16", [True, False])
def test_torch_made_state_through_the_tier_gives_the_host_tier_bits(tmp_path, optimizer, bf16):
    """FRUGAL blockwise renews its window every 2 steps: its group counters must see one step per
    engine step although step() runs once per sub-group."""
    name, client = ("AdamW", torch.optim.AdamW) if optimizer == "client AdamW" else (optimizer, None)
    hosted = memfit.initialize(make_model(), make_config("cpu", bf16=bf16, optimizer=name), optimizer=client)
    expected = train(hosted, 6)
    streamed = memfit.initialize(
        make_model(), make_config("nvme", str(tmp_path), bf16, name, buffer_size=3 * 4096), optimizer=client
    )
    assert len(streamed._update.groups) >= 3
    got = train(streamed, 6)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    report = streamed.memory_report()
    assert report["optimizer_state"] == hosted.memory_report()["optimizer_state"]
    scalar_steps = 4 * len(streamed.masters.names) if client else 0  # torch's AdamW: a tensor in RAM
    assert report["by_tier"]["nvme"] + scalar_steps >= report["optimizer_state"] + report["master_weights"]
    if optimizer == "FRUGAL":
        assert [g["frugal_step"] for g in streamed.optimizer.param_groups] == [
            g["frugal_step"] for g in hosted.optimizer.param_groups
        ]


def test_fp16_overflow_skips_on_the_nvme_tier_as_on_the_host_tier(tmp_path):
    def fp16(device, path=None):
        config = make_config(device, path, bf16=False, buffer_size=3 * 4096)
        config.update(fp16={"enabled": True, "initial_scale_power": 24}, gradient_clipping=0.0)
        return config

    hosted = memfit.initialize(make_model(), fp16("cpu"))
    streamed = memfit.initialize(make_model(), fp16("nvme", str(tmp_path)))
    expected, got = train(hosted, 4), train(streamed, 4)
    assert streamed.skipped_steps == hosted.skipped_steps > 0  # 2**24 overflows at first
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_a_checkpoint_reads_state_from_the_swap_file_without_copying(tmp_path):
    from memfit.checkpointing.state import export_rank_state

    engine = memfit.initialize(make_model(), make_config("nvme", str(tmp_path), buffer_size=3 * 4096))
    train(engine, 1)
    payload = export_rank_state(engine, {})
    swap = engine._update.space.path
    with open("/proc/self/maps") as maps:
        ranges = [line.split() for line in maps]
    mapped = [tuple(int(bound, 16) for bound in fields[0].split("-")) for fields in ranges if fields[-1] == swap]

    def in_swap(tensor):
        return any(start <= tensor.data_ptr() < end for start, end in mapped)

    assert mapped
    for name, state in payload["optimizer_state"].items():
        assert in_swap(state["exp_avg"]) and in_swap(state["exp_avg_sq"]), name
        assert in_swap(payload["params"][name]), name  # the fp32 master, not the bf16 weight


def test_pipeline_read_with_one_buffer_warns_and_reads_in_turn(tmp_path):
    expected = train(memfit.initialize(make_model(), make_config("cpu")))
    with pytest.warns(UserWarning, match="pipeline_read is ignored with buffer_count 1"):
        engine = memfit.initialize(
            make_model(), make_config("nvme", str(tmp_path), buffer_size=3 * 4096, buffer_count=1)
        )
    got = train(engine)
    assert all(torch.equal(got[name], value) for name, value in expected.items())


def test_stale_swap_files_are_deleted_and_live_ones_kept(tmp_path):
    stale = tmp_path / "memfit-swap-rank0-99999-0.swap"
    stale.write_bytes(b"\xff" * 8192)  # a killed run's state: never read back
    live = tmp_path / "memfit-swap-rank0-99998-0.swap"
    live.write_bytes(b"\x00")
    with open(live, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another run that is alive
        expected = train(memfit.initialize(make_model(), make_config("cpu")))
        engine = memfit.initialize(make_model(), make_config("nvme", str(tmp_path), buffer_size=3 * 4096))
        assert not stale.exists() and live.exists()
        got = train(engine)
    assert all(torch.equal(got[name], value) for name, value in expected.items())


KILLED_SCRIPT = """
import sys, time, memfit
from tests.integration.test_nvme_tier import make_config, make_model, train
engine = memfit.initialize(make_model(), make_config("nvme", sys.argv[1], buffer_size=3 * 4096))
train(engine, 1)
print(engine._update.space.path, flush=True)
time.sleep(600)
"""


def test_the_swap_file_of_a_killed_run_is_deleted_by_the_next_run(tmp_path):
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLED_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        left_behind = killed.stdout.readline().strip()
        assert os.path.getsize(left_behind) > 0
    finally:
        killed.kill()  # SIGKILL: no exit handler removes the file
        killed.wait()
    assert os.path.exists(left_behind)
    expected = train(memfit.initialize(make_model(), make_config("cpu")))
    engine = memfit.initialize(make_model(), make_config("nvme", str(tmp_path), buffer_size=3 * 4096))
    assert not os.path.exists(left_behind) and os.path.exists(engine._update.space.path)
    got = train(engine)
    assert all(torch.equal(got[name], value) for name, value in expected.items())


# ---- a write that fails mid-step ----------------------------------------------------------------
FAULT_SCRIPT = """
import os, subprocess, sys, torch, memfit
from tests.integration.test_nvme_tier import make_config, make_model, train
swap_dir, checkpoint_dir = sys.argv[1], sys.argv[2]
engine = memfit.initialize(make_model(), make_config("nvme", swap_dir, buffer_size=3 * 4096))
train(engine, 2)
engine.save_checkpoint(checkpoint_dir)
swap = engine._update.space.path
# The file system fills up behind the swap file: its blocks are given back (as on a thin or
# copy-on-write volume) and another file takes all the room.
subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(os.path.getsize(swap)), swap], check=True)
subprocess.run(["dd", "if=/dev/zero", f"of={swap_dir}/filler", "bs=4k"], capture_output=True)
print("filled", flush=True)
train(engine, 2)
print("still running")
"""


def test_a_write_failing_mid_step_stops_the_run_and_keeps_the_checkpoint(mount_tmpfs, tmp_path):
    swap_dir = mount_tmpfs(f"size={1 << 20}")
    checkpoint_dir = str(tmp_path / f"checkpoints-{uuid.uuid4().hex[:6]}")
    result = subprocess.run(
        [sys.executable, "-c", FAULT_SCRIPT, swap_dir, checkpoint_dir],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode != 0 and "filled" in result.stdout and "still running" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: [Errno 28] writing ") and "No space left on device" in last, result.stderr[-2000:]
    assert "memfit-swap-rank0-" in last and any(name in last for name in ("0.weight/", "0.bias/", "2.weight/"))
    assert verify_checkpoint(os.path.join(checkpoint_dir, "global_step2")) == []


@pytest.fixture
def shrinkable_disk(tmp_path):
    """An ext4 file system on a loop device: shrink() cuts the device under the mounted file system,
    so every read and write of a block past the new end fails with EIO, as on a failing drive."""
    image, mount_point = tmp_path / "disk.img", tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    made = subprocess.run(["mkfs.ext4", "-q", "-O", "^has_journal", str(image)], capture_output=True)
    attached = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if made.returncode != 0 or attached.returncode != 0:
        pytest.skip("cannot make an ext4 file system on a loop device here")
    device = attached.stdout.strip()
    if subprocess.run(["mount", device, str(mount_point)]).returncode != 0:
        subprocess.run(["losetup", "-d", device])
        pytest.skip("cannot mount a loop device here")

    def shrink() -> None:
        subprocess.run(["truncate", "-s", "1M", str(image)], check=True)
        subprocess.run(["losetup", "-c", device], check=True)

    yield str(mount_point), shrink
    subprocess.run(["umount", "-l", str(mount_point)])
    subprocess.run(["losetup", "-d", device])


EIO_SCRIPT = """
import sys, torch, memfit
from tests.integration.test_nvme_tier import make_config, make_model, train
swap_dir, checkpoint_dir = sys.argv[1], sys.argv[2]
engine = memfit.initialize(make_model(), make_config("nvme", swap_dir, buffer_size=3 * 4096))
train(engine, 2)
engine.save_checkpoint(checkpoint_dir)
print("saved", flush=True)
sys.stdin.readline()  # the test cuts the device here
train(engine, 2)
print("still running")
"""


def test_an_io_error_mid_step_stops_the_run_and_keeps_the_checkpoint(shrinkable_disk, tmp_path):
    swap_dir, shrink = shrinkable_disk
    checkpoint_dir = str(tmp_path / "checkpoints")
    process = subprocess.Popen(
        [sys.executable, "-c", EIO_SCRIPT, swap_dir, checkpoint_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert process.stdout.readline().strip() == "saved"
    shrink()
    stdout, stderr = process.communicate("go\n", timeout=300)
    assert process.returncode != 0 and "still running" not in stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: [Errno 5] ") and "Input/output error" in last, stderr[-2000:]
    assert "memfit-swap-rank0-" in last and any(name in last for name in ("0.weight/", "0.bias/", "2.weight/"))
    assert verify_checkpoint(os.path.join(checkpoint_dir, "global_step2")) == []


@pytest.mark.slow  # the fast tier trains on the NVMe tier in the tests above
def test_the_example_trains_with_the_nvme_config(tmp_path):
    with open(os.path.join(ROOT, "examples", "configs", "nvme.json")) as file:
        config = json.load(file)
    config["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(tmp_path)
    path, metrics = tmp_path / "nvme.json", tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(config))
    command = [sys.executable, os.path.join(ROOT, "examples", "train_gpt.py"), "--config", str(path),
               "--max-steps", "12", "--eval-every", "12", "--metrics", str(metrics)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600, cwd=tmp_path)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"] - 0.2
    assert not any(name.endswith(".swap") for name in os.listdir(tmp_path))  # removed at exit
