"""One contract, every tier's update (memfit/offload/interface.py): built by the one build
function from a config, each one reports the touched gradients and drops the rest, sees an inf,
steps as torch's own optimizer does with every gradient multiplied, skips without a trace, and
counts its masters and state."""

import pytest
import torch

from memfit.config import ClientComponents, resolve_config
from memfit.offload.build import build_update
from memfit.offload.in_memory import KernelUpdate, OptimizerUpdate
from memfit.offload.nvme_kernel import NvmeKernelUpdate
from memfit.offload.nvme_optimizer import NvmeOptimizerUpdate

OPTIMIZERS = {
    "AdamW": ({"lr": 1e-2, "weight_decay": 0.1}, lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)),
    "SGD": (
        {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1},
        lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
    ),
}
STATE_BYTES_PER_PARAM = {"AdamW": 8, "SGD": 4}
IMPLEMENTATIONS = {  # (offload_optimizer device, optimizer) -> the update the build must choose
    ("none", "AdamW"): OptimizerUpdate,
    ("none", "SGD"): OptimizerUpdate,
    ("cpu", "AdamW"): KernelUpdate,
    ("cpu", "SGD"): OptimizerUpdate,
    ("nvme", "AdamW"): NvmeKernelUpdate,
    ("nvme", "SGD"): NvmeOptimizerUpdate,
}
SHAPES = [(64, 32), (32,), (4, 4)]


def build(device: str, optimizer: str, tmp_path, dtype=torch.float32):
    offload = {"device": device}
    if device == "nvme":
        offload.update(nvme_path=str(tmp_path), buffer_size=3 * 4096, buffer_count=3)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": optimizer, "params": OPTIMIZERS[optimizer][0]},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {"stage": 1, "offload_optimizer": offload},
    }
    cfg = resolve_config(config, 1, ClientComponents()).config
    generator = torch.Generator().manual_seed(3)
    named = [
        (f"p{i}", torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)))
        for i, shape in enumerate(SHAPES)
    ]
    compute_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
    _, _, update, _ = build_update(None, cfg, named, compute_dtype, torch.device("cpu"), 1)
    return [p for _, p in named], update


def give_grads(params, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    return grads


@pytest.fixture(params=sorted(IMPLEMENTATIONS), ids=lambda key: "-".join(key))
def implementation(request):
    return request.param


def test_the_build_chooses_the_tier_the_config_names(implementation, tmp_path):
    _, update = build(*implementation, tmp_path)
    assert type(update) is IMPLEMENTATIONS[implementation]


def test_gradients_are_the_touched_ones_and_an_inf_is_seen(implementation, tmp_path):
    params, update = build(*implementation, tmp_path)
    give_grads(params, seed=1)
    grads = update.gradients({id(params[0]), id(params[2])})
    assert params[1].grad is None  # untouched: the optimizer skips it
    assert [tuple(g.shape) for g in grads] == [SHAPES[0], SHAPES[2]]
    assert not update.nonfinite(grads)
    params[2].grad[1, 1] = float("inf")
    assert update.nonfinite(update.gradients({id(params[0]), id(params[2])}))


def test_apply_steps_as_torch_with_the_multiplier_and_skip_leaves_no_trace(implementation, tmp_path):
    device, optimizer = implementation
    params, update = build(device, optimizer, tmp_path)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_optimizer = OPTIMIZERS[optimizer][1](reference)
    multiplier = torch.tensor(0.5)
    for step in range(3):
        grads = give_grads(params, seed=10 + step)
        for param, grad in zip(reference, grads):
            param.grad = grad * multiplier
        update.gradients({id(p) for p in params})
        update.apply(multiplier)
        torch_optimizer.step()
        assert all(p.grad is None for p in params)  # dropped with the step
        for got, expected in zip(params, reference):
            torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in params]
    state_before = update.state_bytes
    give_grads(params, seed=99)
    update.gradients({id(p) for p in params})
    update.skip()
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert update.state_bytes == state_before
    numel = sum(p.numel() for p in params)
    counters = 8 * len(params)  # torch's AdamW keeps its step count as a tensor per parameter
    assert 0 <= update.state_bytes - STATE_BYTES_PER_PARAM[optimizer] * numel <= counters
    assert update.master_bytes == 0  # fp32 parameters on the CPU are their own masters


def test_a_16_bit_model_keeps_fp32_masters_in_every_tier(implementation, tmp_path):
    params, update = build(*implementation, tmp_path, dtype=torch.bfloat16)
    give_grads(params, seed=5)
    update.gradients({id(p) for p in params})
    update.apply(None)
    assert update.master_bytes == 4 * sum(p.numel() for p in params)
