"""`memfit export`: a checkpoint saved by 2 ranks at ZeRO stage 2, or with the optimizer on the
NVMe tier, becomes one state dict under the model's names; a fresh single-process model that
loads it (load_state_dict, safetensors' load_file, Hugging Face's sharded layout) computes what
the trained engine computes. A damaged checkpoint is refused in one line naming the file."""

import contextlib
import io
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import memfit
from memfit.launcher.cli import main
from tests.distributed.harness import run_ranks

INPUTS = torch.arange(12) % 16


class TiedModel(torch.nn.Module):
    """Tied embedding and head, a frozen bias, BatchNorm statistics (persistent buffers) and a
    non-persistent buffer: everything a state dict can hold besides plain weights."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.proj.bias.requires_grad_(False)
        self.register_buffer("offset", torch.full((8,), 0.5), persistent=False)

    def forward(self, tokens):
        return self.head(self.norm(self.proj(self.embed(tokens)) + self.offset))


def fresh_model(seed=123):
    torch.manual_seed(seed)
    return TiedModel()


def train_and_save(rank, world_size, save_dir, offload):
    zero = {"stage": 2}
    if offload == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": save_dir}
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 0.05}},
              "zero_optimization": zero}  # fmt: skip
    engine = memfit.initialize(fresh_model(seed=0), config)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):
        tokens = torch.randint(0, 16, (4,), generator=generator)
        engine.backward(torch.nn.functional.cross_entropy(engine(tokens), tokens))
        engine.step()
    engine.save_checkpoint(os.path.join(save_dir, "ckpt"))
    engine.eval()
    with torch.no_grad():
        return engine(INPUTS)


def export(*args):
    """`memfit export ARGS` through the command's entry point, in this process: (exit status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = main(["export", *map(str, args)])
    return status, stderr.getvalue()


def outputs_of(state_dict):
    model = fresh_model()
    model.load_state_dict(state_dict)  # strict: every name the model has, no other
    model.eval()
    with torch.no_grad():
        return model(INPUTS)


@pytest.fixture(scope="module")
def stage2_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stage2")
    return directory, run_ranks(train_and_save, 2, str(directory), "none")[0]


def test_stage2_checkpoint_exports_to_safetensors_and_torch(stage2_checkpoint, tmp_path):
    directory, trained = stage2_checkpoint
    assert export(directory / "ckpt", tmp_path / "st")[0] == 0
    assert torch.equal(outputs_of(load_file(tmp_path / "st" / "model.safetensors")), trained)
    assert export(directory / "ckpt", tmp_path / "pt", "--format", "torch")[0] == 0
    assert torch.equal(outputs_of(torch.load(tmp_path / "pt" / "pytorch_model.bin", weights_only=True)), trained)
    assert export(directory / "ckpt", tmp_path / "bf16", "--dtype", "bf16")[0] == 0
    half = load_file(tmp_path / "bf16" / "model.safetensors")
    assert half["proj.weight"].dtype == torch.bfloat16 and half["norm.num_batches_tracked"].dtype == torch.int64


def test_a_large_model_is_sharded_as_hugging_face_lays_it_out(stage2_checkpoint, tmp_path):
    directory, trained = stage2_checkpoint
    status, stderr = export(directory / "ckpt", tmp_path, "--max-shard-size", "300B")
    assert status == 0, stderr
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    state = {}
    for name in files:
        state.update(load_file(tmp_path / name))
    assert sorted(state) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert torch.equal(outputs_of(state), trained)


def test_nvme_tier_checkpoint_exports(tmp_path):
    trained = train_and_save(0, 1, str(tmp_path), "nvme")  # one rank, in this process: the tier is the point
    assert export(tmp_path / "ckpt", tmp_path / "out")[0] == 0
    assert torch.equal(outputs_of(load_file(tmp_path / "out" / "model.safetensors")), trained)


def test_a_damaged_checkpoint_is_refused(stage2_checkpoint, tmp_path):
    directory, _ = stage2_checkpoint
    tag = directory / "ckpt" / (directory / "ckpt" / "latest").read_text().strip()
    for damage in ("flip", "truncate"):
        copy = tmp_path / damage
        shutil.copytree(tag, copy)
        data = bytearray((copy / "rank1.pt").read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        else:
            data = data[: len(data) - 100]
        (copy / "rank1.pt").write_bytes(bytes(data))
        status, stderr = export(copy, tmp_path / f"out-{damage}")
        assert status == 2
        assert stderr.startswith(f"memfit export: {copy / 'rank1.pt'}: "), stderr
        assert len(stderr.strip().splitlines()) == 1


def test_save_16bit_model_writes_what_the_engine_trains(tmp_path):
    config = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}}
    engine = memfit.initialize(fresh_model(seed=0), config)
    tokens = torch.arange(4)
    engine.backward(torch.nn.functional.cross_entropy(engine(tokens).float(), tokens))
    engine.step()
    assert engine.save_16bit_model(tmp_path, "model.safetensors")
    engine.save_16bit_model(tmp_path)  # DeepSpeed's default name, torch.save
    for state in (load_file(tmp_path / "model.safetensors"), torch.load(tmp_path / "pytorch_model.bin")):
        assert state["proj.weight"].dtype == torch.bfloat16
        for name, value in engine.module.state_dict().items():
            assert torch.equal(state[name], value), name
