"""offload_param.max_in_cpu (DeepSpeed's key): under "nvme" the first owned tensors, up to that
many elements, rest in host memory instead of the swap file. Training ends bit for bit where
stage 2 ends, on one rank (streamed step, where their gradients stay in memory too) and on two;
the kept values stay out of the swap file, cost no swap reads, show in memory_report and in the
estimate; a change made inside
GatheredParameters without a modifier rank does not leak into them."""

import os

import pytest
import torch

import memfit
import memfit.deepspeed as deepspeed
from memfit.runtime.estimate import CATEGORIES, estimate, shapes_of
from tests.distributed.harness import run_ranks
from tests.distributed.models import TiedModel, global_batches, micro_batches

GLOBAL_BATCH, ACCUMULATION, STEPS = 8, 2, 4
# TiedModel's tensors of 20 elements or more, in order: embed.weight 384, mlp.0.weight 576,
# mlp.0.bias 24, head.weight 128; 960 keeps the first two (the third would pass the limit)
KEEP_TWO = 384 + 576
KEPT = ["embed.weight", "mlp.0.weight"]


def config(stage: int, path: str | None = None, max_in_cpu: int | None = None, optimizer_nvme: bool = True) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 20
        zero["offload_param"] = {"device": "nvme", "nvme_path": path}
        if max_in_cpu is not None:
            zero["offload_param"]["max_in_cpu"] = max_in_cpu
    if optimizer_nvme:
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": path, "buffer_size": 4096 * 3, "buffer_count": 3}
    return {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "bf16": {"enabled": True},
        "zero_optimization": zero,
    }


def tied_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TiedModel()


def train(engine, rank: int = 0, world_size: int = 1) -> dict:
    for batch in global_batches(STEPS, GLOBAL_BATCH, seed=5):
        for inputs, targets in micro_batches(batch, rank, world_size, ACCUMULATION):
            engine.backward(torch.nn.functional.mse_loss(engine(inputs.to(torch.bfloat16)).float(), targets))
            engine.step()
    with engine.gathered_parameters():
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def assert_equal(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs by {(got[name] - value).abs().max()}"


def test_kept_tensors_train_as_stage2_and_skip_the_swap_file(tmp_path):
    expected = train(memfit.initialize(tied_model(), config(2, str(tmp_path))))
    streamed = memfit.initialize(tied_model(), config(3, str(tmp_path), max_in_cpu=0))
    assert_equal(train(streamed), expected)
    engine = memfit.initialize(tied_model(), config(3, str(tmp_path), max_in_cpu=KEEP_TWO))
    assert engine._stage3.streamed is not None, "the streamed step is not in use"
    assert_equal(train(engine), expected)
    store = engine._stage3.store
    kept = [store.name_of[key] for key, values in store.kept.items() if values is not None]
    assert kept == KEPT
    slots = store.swap.names()
    assert not any(name in slots or f"{name}/grad" in slots for name in KEPT)
    assert "head.weight" in slots and "head.weight/grad" in slots  # past the limit: on NVMe
    # every forward, backward and update reads the other tensors only
    assert engine._stage3.store.transferred_bytes[0] < streamed._stage3.store.transferred_bytes[0]
    kept_bytes = sum(p.numel() * 2 for name, p in engine.module.named_parameters() if name in KEPT)
    assert store.kept_bytes == store.kept_grad_bytes == kept_bytes
    report = engine.memory_report()
    small = sum(p.ds_numel * 2 for p in engine.module.parameters() if p.ds_numel < 20)
    assert report["params"] == small + kept_bytes and report["grads"] == kept_bytes
    predicted = estimate(shapes_of(tied_model()), engine.config, 1)[0]
    for category in CATEGORIES:
        assert report[category] == predicted.bytes[category], category
    assert report["by_tier"]["nvme"] == predicted.tiers["nvme"] < streamed.memory_report()["by_tier"]["nvme"]
    assert report["by_tier"]["host"] - streamed.memory_report()["by_tier"]["host"] == 2 * kept_bytes
    assert predicted.tiers["host"] - estimate(shapes_of(tied_model()), streamed.config, 1)[0].tiers["host"] == (
        2 * kept_bytes
    )


def test_a_change_not_kept_leaves_a_kept_tensor_as_it_was(tmp_path):
    engine = memfit.initialize(tied_model(), config(3, str(tmp_path), max_in_cpu=KEEP_TWO))
    weight = engine.module.embed.weight
    with deepspeed.zero.GatheredParameters([weight]):
        before = weight.detach().clone()
        weight.data.add_(1.0)  # no modifier_rank: discarded at the end, as in DeepSpeed
    with deepspeed.zero.GatheredParameters([weight]):
        assert torch.equal(weight.detach(), before)
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
        weight.data.add_(1.0)  # kept
    with deepspeed.zero.GatheredParameters([weight]):
        assert torch.equal(weight.detach(), before + 1.0)


def two_rank_runs(rank, world_size, root):
    path = os.path.join(root, f"rank{rank}")
    os.makedirs(path, exist_ok=True)
    runs = {}
    for name, stage, limit in (("stage 2", 2, None), ("stage 3, none kept", 3, 0), ("stage 3, two kept", 3, KEEP_TWO)):
        engine = memfit.initialize(tied_model(), config(stage, path, limit, optimizer_nvme=False))
        runs[name] = train(engine, rank, world_size)
        if stage == 3:
            runs[name + ": swap reads"] = engine._stage3.store.transferred_bytes[0]
    return runs


@pytest.mark.slow
def test_kept_tensors_train_as_stage2_on_two_ranks(tmp_path):
    for runs in run_ranks(two_rank_runs, 2, str(tmp_path)):
        assert_equal(runs["stage 3, none kept"], runs["stage 2"])
        assert_equal(runs["stage 3, two kept"], runs["stage 2"])
        assert runs["stage 3, two kept: swap reads"] < runs["stage 3, none kept: swap reads"]
