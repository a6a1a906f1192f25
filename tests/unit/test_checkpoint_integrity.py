"""Checkpoints never load wrong data and never leave a mixed one: a flipped byte, a truncated or
missing file, a bad manifest, a file from another save and a full disk are each refused with a
message naming the file (and the tensor); saves are atomic; buffers and frozen parameters are
saved; old tags rotate."""

import json
import logging
import os
import shutil
import subprocess

import pytest
import torch

import memfit
from memfit.checkpointing import CheckpointError, verify_checkpoint


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.mlp = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.norm(self.mlp(torch.tanh(self.frozen(x)))))


CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 5}},
}


def make_engine(seed=0):
    torch.manual_seed(seed)
    return memfit.initialize(Net(), CONFIG)


def train(engine, steps, seed=1):
    generator = torch.Generator().manual_seed(seed + engine.global_step)
    for _ in range(steps):
        engine.backward(engine(torch.randn(4, 8, generator=generator)).pow(2).mean())
        engine.step()


def snapshot(engine):
    return {key: value.clone() for key, value in engine.module.state_dict().items()}


@pytest.fixture
def saved(tmp_path):
    engine = make_engine()
    train(engine, 2)
    directory = engine.save_checkpoint(tmp_path / "ckpt", client_state={"position": 2})
    return engine, directory, tmp_path / "ckpt"


def test_round_trip_restores_buffers_frozen_params_and_continues_exactly(saved, caplog):
    engine, directory, root = saved
    before = snapshot(engine)
    train(engine, 2)
    never_stopped = snapshot(engine)

    resumed = make_engine(seed=5)  # different initial values everywhere, frozen layer included
    with caplog.at_level(logging.INFO, logger="memfit"):
        client = resumed.load_checkpoint(root)
    assert client == {"position": 2}
    assert f"resumed from {directory} (step 2)" in caplog.text
    for key, value in snapshot(resumed).items():
        assert torch.equal(value, before[key]), key  # running_mean / running_var and frozen.* included
    train(resumed, 2)
    for key, value in snapshot(resumed).items():
        assert torch.equal(value, never_stopped[key]), key


def flip_byte_inside(path, needle: bytes):
    data = bytearray(open(path, "rb").read())
    offset = data.find(needle)
    assert offset >= 0, "tensor bytes not found in the file"
    data[offset + len(needle) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_flipped_byte_in_a_tensor_names_file_and_tensor(saved):
    engine, directory, root = saved
    weight = engine.module.mlp.weight.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    flip_byte_inside(os.path.join(directory, "rank0.pt"), weight)
    with pytest.raises(CheckpointError, match=r"rank0\.pt: checksum mismatch in tensor 'params/mlp\.weight'"):
        make_engine().load_checkpoint(root)
    assert any("mlp.weight" in problem for problem in verify_checkpoint(directory))


def test_flipped_byte_in_a_buffer_is_caught(saved):
    engine, directory, root = saved
    running_var = engine.module.norm.running_var.numpy().tobytes()
    flip_byte_inside(os.path.join(directory, "rank0.pt"), running_var)
    with pytest.raises(CheckpointError, match=r"checksum mismatch in tensor 'buffers/norm\.running_var'"):
        make_engine().load_checkpoint(root)


def test_flipped_digit_in_non_tensor_data_is_caught(saved):
    _, directory, root = saved
    path = os.path.join(directory, "rank0.pt")
    data = open(path, "rb").read()
    # torch.save pickles the client state's key as plain text: change it
    assert data.count(b"position") == 1
    open(path, "wb").write(data.replace(b"position", b"pOsition"))
    with pytest.raises(CheckpointError, match=r"rank0\.pt: content differs from the manifest"):
        make_engine().load_checkpoint(root)


def test_truncated_file(saved):
    _, directory, root = saved
    path = os.path.join(directory, "rank0.pt")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"rank0\.pt: \d+ bytes, the manifest says \d+ \(truncated"):
        make_engine().load_checkpoint(root)
    assert verify_checkpoint(directory)


def test_missing_file(saved):
    _, directory, root = saved
    os.remove(os.path.join(directory, "rank0.pt"))
    with pytest.raises(CheckpointError, match=r"rank0\.pt: No such file or directory \(ENOENT\)"):
        make_engine().load_checkpoint(root)
    assert verify_checkpoint(directory) == [f"{directory}/rank0.pt: missing"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "unreadable manifest"),
        (lambda text: text.replace('"global_step": 2', '"global_step": 3'), "manifest digest mismatch"),
        (lambda text: json.dumps({"hello": 1}), "not a memfit checkpoint manifest"),
        (lambda text: "\xff\xfe", "unreadable manifest"),
    ],
    ids=["truncated", "changed-step", "foreign", "not-utf8"],
)
def test_bad_manifest(saved, damage, message):
    _, directory, root = saved
    path = os.path.join(directory, "manifest.json")
    text = open(path).read()
    open(path, "w", encoding="latin-1").write(damage(text))
    with pytest.raises(CheckpointError, match=f"manifest.json: {message}"):
        make_engine().load_checkpoint(root)


def test_missing_manifest_is_an_incomplete_checkpoint(saved):
    _, directory, root = saved
    os.remove(os.path.join(directory, "manifest.json"))
    with pytest.raises(CheckpointError, match=r"manifest.json: missing \(an incomplete checkpoint\)"):
        make_engine().load_checkpoint(root)


def test_file_from_another_save_is_refused(saved):
    engine, first_directory, root = saved
    train(engine, 1)
    second_directory = engine.save_checkpoint(root)
    shutil.copy(os.path.join(first_directory, "rank0.pt"), os.path.join(second_directory, "rank0.pt"))
    with pytest.raises(CheckpointError, match=r"global_step3/rank0\.pt: \d+ bytes, the manifest says|content differs"):
        make_engine().load_checkpoint(root)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint here \(no 'latest' file\)"):
        make_engine().load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("missing_tag")
    with pytest.raises(CheckpointError, match=r"missing_tag: no such checkpoint"):
        make_engine().load_checkpoint(tmp_path)


def test_resaving_a_tag_replaces_it_whole_and_keep_rotates(tmp_path):
    engine = make_engine()
    root = tmp_path / "ckpt"
    for _ in range(4):
        train(engine, 1)
        engine.save_checkpoint(root, keep=2)
    assert sorted(p for p in os.listdir(root) if not p.startswith("latest")) == ["global_step3", "global_step4"]
    engine.save_checkpoint(root, tag="global_step4")  # same tag again: exchanged atomically
    assert not [p for p in os.listdir(root) if p.startswith(".")]
    assert make_engine().load_checkpoint(root) == {}
    with pytest.raises(ValueError, match="keep: expected a positive number"):
        engine.save_checkpoint(root, keep=0)
    with pytest.raises(ValueError, match="tag: expected a plain directory name"):
        engine.save_checkpoint(root, tag="../escape")


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_names_enospc_keeps_previous_checkpoint(small_tmpfs):
    engine = make_engine()
    train(engine, 1)
    engine.save_checkpoint(small_tmpfs)  # the first one fits
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize - 4096))
    train(engine, 1)
    with pytest.raises(CheckpointError, match=r"\.tmp-global_step2/rank0\.pt: No space left on device \(ENOSPC\)"):
        engine.save_checkpoint(small_tmpfs)
    ballast.unlink()
    assert sorted(os.listdir(small_tmpfs)) == ["global_step1", "latest"]  # no temporary files left
    resumed = make_engine(seed=3)
    resumed.load_checkpoint(small_tmpfs)
    assert resumed.global_step == 1
