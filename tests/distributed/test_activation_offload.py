"""memfit.activation_offload "nvme": the inputs checkpointed blocks keep for backward rest in the
rank's activation swap file. Training ends bit for bit where it ends without checkpointing (fp32
on the CPU, dropout replayed with the first run's RNG state, at stage 0 and at stage 3 with
parameters on NVMe, on 1 and 2 ranks); the block inputs are on NVMe between forward and backward,
and their slots are freed by backward or when the graph is dropped; misuse is one clear line."""

import weakref

import pytest
import torch

import memfit
from memfit.config import ConfigError
from tests.distributed.harness import run_ranks

STEPS, MICRO, WIDTH, BLOCKS = 3, 4, 24, 3


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.down = torch.nn.Linear(2 * WIDTH, WIDTH)
        self.dropout = torch.nn.Dropout(0.2)

    def forward(self, x, scale):
        return x + self.dropout(self.down(torch.nn.functional.gelu(self.up(x)))) * scale


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, WIDTH, bias=False)
        self.layers = torch.nn.ModuleList(Block() for _ in range(BLOCKS))
        self.register_buffer("scale", torch.tensor(0.5))  # a tensor argument without a gradient

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, self.scale)
        return h @ self.embed.weight


def config(stage: int, swap_dir=None, param_dir=None, blocks="auto", swap_bytes=1 << 20) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 100
    if param_dir is not None:
        zero["offload_param"] = {"device": "nvme", "nvme_path": param_dir}
    own = {"checkpoint_blocks": blocks if swap_dir else None}
    if swap_dir:
        own["activation_offload"] = {"device": "nvme", "nvme_path": swap_dir, "swap_bytes": swap_bytes}
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": zero,
        "memfit": own,
    }


def train(rank, stage, swap_dir=None, param_dir=None) -> dict:
    torch.manual_seed(0)
    engine = memfit.initialize(Stack(), config(stage, swap_dir, param_dir))
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        for _ in range(2):
            engine.backward(engine(torch.randn(MICRO, 8, generator=generator)).square().mean())
            engine.step()
    with engine.gathered_parameters():
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def assert_same(got: dict, expected: dict, what: str) -> None:
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{what}: {name} differs by {(got[name] - value).abs().max()}"


def test_offloaded_block_inputs_train_as_plain_training(tmp_path):
    (tmp_path / "params").mkdir()
    assert_same(train(0, 0, str(tmp_path)), train(0, 0), "stage 0")
    assert_same(train(0, 3, str(tmp_path), str(tmp_path / "params")), train(0, 3), "stage 3, parameters on NVMe")


def both_ways(rank, world_size, swap_dir):
    return train(rank, 2, swap_dir), train(rank, 2)


@pytest.mark.slow
def test_offloaded_block_inputs_on_two_ranks(tmp_path):
    for offloaded, plain in run_ranks(both_ways, 2, str(tmp_path)):
        assert_same(offloaded, plain, "2 ranks, stage 2")


def test_block_inputs_rest_on_nvme_until_backward_and_a_dropped_graph_frees_them(tmp_path):
    engine = memfit.initialize(Stack(), config(0, str(tmp_path)))
    swap = engine.module.layers[0].forward.args[2]
    inputs = []
    for layer in engine.module.layers:
        layer.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    x = torch.randn(MICRO, 8)
    loss = engine(x).square().mean()
    assert swap.swap.bytes_in_use == BLOCKS * MICRO * WIDTH * 4
    for kept in [ref() for ref in swap._kept]:
        kept.written.wait()
    swap.release_written()
    assert len(inputs) == BLOCKS and all(ref() is None for ref in inputs)  # nothing in memory holds them
    engine.backward(loss)
    assert swap.swap.bytes_in_use == 0
    engine(x).square().mean()  # a forward whose graph is dropped without a backward
    assert swap.swap.bytes_in_use == 0


def test_misuse_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match='activation_offload.device: "nvme" needs checkpoint_blocks'):
        memfit.initialize(Stack(), config(0, str(tmp_path), blocks=None))
    with pytest.raises(ConfigError, match="memfit.activation_offload.nvme_path: .*missing does not exist"):
        memfit.initialize(Stack(), config(0, str(tmp_path / "missing")))
    engine = memfit.initialize(Stack(), config(0, str(tmp_path), swap_bytes=4096))
    with pytest.raises(OSError, match="raise memfit.activation_offload.swap_bytes"):
        engine(torch.randn(64, 8))
