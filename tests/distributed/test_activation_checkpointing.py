"""Activation checkpointing: with memfit.checkpoint_blocks (or a script calling
deepspeed.checkpointing.checkpoint) training ends bit for bit where it ends without, in fp32 on
the CPU, at every ZeRO stage and with parameters on NVMe; the blocks keep only their inputs; a
setting that selects nothing is one clear error."""

import pytest
import torch

import memfit
import memfit.deepspeed as deepspeed
from memfit.config import ConfigError
from tests.distributed.harness import run_ranks

STEPS, MICRO, WIDTH = 3, 4, 24


class Block(torch.nn.Module):
    """A residual MLP with a scale its own forward reads (a stage-3 tensor outside any submodule)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.down = torch.nn.Linear(2 * WIDTH, WIDTH)
        self.scale = torch.nn.Parameter(torch.full((WIDTH, WIDTH), 0.1))

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x))) @ self.scale


class Stack(torch.nn.Module):
    def __init__(self, by_hand: bool = False):
        super().__init__()
        self.embed = torch.nn.Linear(8, WIDTH, bias=False)
        self.layers = torch.nn.ModuleList(Block() for _ in range(3))
        self.by_hand = by_hand  # the script checkpoints each block itself (Megatron style)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = deepspeed.checkpointing.checkpoint(layer, h) if self.by_hand else layer(h)
        return h @ self.embed.weight  # the tied head, read in the parent's forward


def stack(by_hand: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return Stack(by_hand)


def config(stage: int, blocks=None, nvme_path=None) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 100  # weights and scales gathered, biases kept
    if nvme_path is not None:
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme_path}
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": zero,
        "memfit": {"checkpoint_blocks": blocks},
    }


def train(rank, world_size, stage, blocks, by_hand=False, nvme_path=None) -> dict:
    engine = memfit.initialize(stack(by_hand), config(stage, blocks, nvme_path))
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        for _ in range(2):
            x = torch.randn(MICRO, 8, generator=generator)
            engine.backward(engine(x).square().mean())
            engine.step()
    with engine.gathered_parameters():
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def every_setting(rank, world_size, nvme_path):
    results = {}
    for stage in (0, 1, 2, 3):
        results[stage, "none"] = train(rank, world_size, stage, None)
        results[stage, "auto"] = train(rank, world_size, stage, "auto")
    results[2, "by class"] = train(rank, world_size, 2, ["Block"])
    results[3, "by hand"] = train(rank, world_size, 3, None, by_hand=True)
    results[3, "auto, nvme"] = train(rank, world_size, 3, "auto", nvme_path=nvme_path)
    return results


def test_checkpointed_training_equals_plain_training(tmp_path):
    per_rank = run_ranks(every_setting, 2, str(tmp_path))
    for results in per_rank:
        for (stage, how), params in results.items():
            expected = results[stage if how != "auto, nvme" else 3, "none"]
            for name, value in params.items():
                assert torch.equal(value, expected[name]), f"stage {stage}, {how}: {name}"


def saved_bytes(model, x) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum()
    return total


def test_checkpointed_blocks_keep_only_their_inputs():
    x = torch.randn(64, 8)
    plain = saved_bytes(memfit.initialize(stack(), config(0)).module, x)
    checkpointed = saved_bytes(memfit.initialize(stack(), config(0, "auto")).module, x)
    block_inputs = 3 * 64 * WIDTH * 4
    assert checkpointed < plain / 2 and checkpointed >= block_inputs


@pytest.mark.parametrize(
    "blocks, message",
    [
        ("auto", 'memfit.checkpoint_blocks: "auto" found no ModuleList in the model; name block classes'),
        (["Bloc"], "memfit.checkpoint_blocks: no module of class ['Bloc'] in the model"),
    ],
)
def test_a_selection_of_nothing_is_one_clear_error(blocks, message):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"^memfit.initialize: " + message.replace("[", r"\[").replace("]", r"\]")):
        memfit.initialize(model, config(0, blocks))
