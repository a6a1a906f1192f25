"""The config's "Lamb": DeepSpeed FusedLamb's step (a per-tensor trust ratio ||p|| / ||update||
clamped to [min_coeff, max_coeff], weight decay inside the update, bias correction in the step
size only, eps outside or inside the square root)."""

import io
import math

import pytest
import torch

from memfit.optim.lamb import Lamb
from memfit.optim.registry import build_optimizer

SHAPES = [(12, 20), (30,), (5, 2, 3)]


def make_params(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def gradients(num_steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(num_steps)]


def run(optimizer, params, steps):
    for grads in steps:
        for param, grad in zip(params, grads):
            param.grad = grad.clone().to(param.dtype)
        optimizer.step()


def fused_lamb_reference(params, steps, lr, betas, eps, weight_decay, bias_correction, eps_inside_sqrt, bounds):
    """DeepSpeed's fused_lamb_cuda_kernel.cu (part 1 to 3), written out in float64."""
    beta1, beta2 = betas
    min_coeff, max_coeff = bounds
    values = [p.detach().double().clone() for p in params]
    moments = [(torch.zeros_like(v), torch.zeros_like(v)) for v in values]
    for step, grads in enumerate(steps, start=1):
        if bias_correction:
            step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        else:
            step_size = lr
        for value, (m, v), grad in zip(values, moments, grads):
            g = grad.double()
            m.copy_(beta1 * m + (1 - beta1) * g)
            v.copy_(beta2 * v + (1 - beta2) * g * g)
            denom = (v + eps).sqrt() if eps_inside_sqrt else v.sqrt() + eps
            update = m / denom + weight_decay * value
            weight_norm, update_norm = value.norm(), update.norm()
            coeff = 1.0
            if weight_norm != 0 and update_norm != 0:
                coeff = min(max(float(weight_norm / update_norm), min_coeff), max_coeff)
            value.copy_(value - step_size * coeff * update)
    return values


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_config_lamb_follows_fused_lamb(bias_correction, eps_inside_sqrt, weight_decay):
    params = make_params()
    config = {
        "lr": 2e-2,
        "betas": [0.85, 0.98],
        "eps": 1e-6,
        "weight_decay": weight_decay,
        "bias_correction": bias_correction,
        "eps_inside_sqrt": eps_inside_sqrt,
        "max_coeff": 10.0,
        "min_coeff": 0.01,
    }
    optimizer = build_optimizer("Lamb", [(f"p{i}", p) for i, p in enumerate(params)], config)
    assert isinstance(optimizer, Lamb)
    steps = gradients(8)
    expected = fused_lamb_reference(
        params, steps, 2e-2, (0.85, 0.98), 1e-6, weight_decay, bias_correction, eps_inside_sqrt, (0.01, 10.0)
    )
    run(optimizer, params, steps)
    for param, value in zip(params, expected):
        torch.testing.assert_close(param.data.double(), value, rtol=1e-5, atol=1e-6)
    assert len(optimizer.get_lamb_coeffs()) == len(params)


def test_first_step_in_closed_form():
    """Step 1 with eps 0: u = c sign(g) with c = (1-b1)/sqrt(1-b2), so the ratio is
    ||p|| / (c sqrt(numel)); the step size lr / c removes c from u but not from the ratio,
    which FusedLamb takes of the uncorrected update: p moves by lr ||p|| / (c sqrt(numel))."""
    params = make_params()
    start = [p.detach().clone() for p in params]
    steps = gradients(1)
    run(Lamb(params, lr=0.1, eps=0.0), params, steps)
    c = (1 - 0.9) / math.sqrt(1 - 0.999)
    for param, before, grad in zip(params, start, steps[0]):
        expected = before - 0.1 * before.norm() / (c * math.sqrt(before.numel())) * torch.sign(grad)
        torch.testing.assert_close(param.data, expected, rtol=1e-5, atol=1e-6)


def test_trust_ratio_is_clamped_and_one_for_zero_weights():
    big = torch.nn.Parameter(torch.full((4, 4), 1e3))
    zero = torch.nn.Parameter(torch.zeros(4, 4))
    tiny = torch.nn.Parameter(torch.full((4, 4), 1e-9))
    optimizer = Lamb([big, zero, tiny], lr=0.1, max_coeff=10.0, min_coeff=0.01)
    for param in (big, zero, tiny):
        param.grad = torch.ones(4, 4)
    optimizer.step()
    assert optimizer.get_lamb_coeffs() == pytest.approx([10.0, 1.0, 0.01])


def test_state_round_trips_and_resume_is_bit_identical():
    params = make_params()
    optimizer = Lamb(params, lr=1e-2, weight_decay=0.01)
    steps = gradients(6)
    run(optimizer, params, steps[:3])
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [torch.nn.Parameter(value.clone()) for value in saved["params"]]
    resumed = Lamb(resumed_params, lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(saved["optimizer"])
    run(optimizer, params, steps[3:])
    run(resumed, resumed_params, steps[3:])
    for a, b in zip(params, resumed_params):
        assert torch.equal(a.data, b.data)


def test_bf16_parameters_keep_state_in_their_dtype():
    params = make_params(dtype=torch.bfloat16)
    optimizer = Lamb(params, lr=1e-2)
    run(optimizer, params, gradients(2))
    assert all(optimizer.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"amsgrad": True}, "amsgrad"),
        ({"max_grad_norm": 1.0}, "gradient_clipping"),
        ({"max_coeff": 0.001, "min_coeff": 0.01}, "min_coeff"),
        ({"min_coeff": -1.0}, "min_coeff"),
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"bias_correction": "yes"}, "bias_correction"),
        ({"eps_inside_sqrt": None}, "eps_inside_sqrt"),
    ],
)
def test_bad_settings_are_one_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer("Lamb", [("w", torch.nn.Parameter(torch.randn(3, 3)))], config)


def test_a_config_naming_lamb_is_accepted():
    from memfit.config import load_config

    config = load_config({"train_batch_size": 4, "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}})
    assert config.optimizer.type == "Lamb"
