"""The config's "Adam" and "AdamW": torch's fused kernel where it exists, and DeepSpeed's meaning
of bias_correction and adam_w_mode (FusedAdam, DeepSpeedCPUAdam)."""

import warnings

import pytest
import torch

from memfit.optim.adam import DeepSpeedAdam, fused_supported
from memfit.optim.registry import build_optimizer

SHAPES = [(16, 40), (40,), (7, 3, 2), (1,)]


def make_params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def run(optimizer, params, num_steps=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step()


def named(params):
    return [(f"p{index}", param) for index, param in enumerate(params)]


CONFIG = {"lr": 1e-2, "betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": 0.1}


@pytest.mark.parametrize(
    "name,extra,reference",
    [
        ("AdamW", {}, torch.optim.AdamW),
        ("Adam", {}, torch.optim.AdamW),  # DeepSpeed's Adam is AdamW unless adam_w_mode is false
        ("Adam", {"adam_w_mode": False}, torch.optim.Adam),
        ("Adam", {"bias_correction": True, "adam_w_mode": True}, torch.optim.AdamW),
    ],
)
def test_config_adam_is_fused_and_equals_torch(name, extra, reference):
    params = make_params()
    reference_params = clone(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = build_optimizer(name, named(params), {**CONFIG, **extra})
    assert isinstance(optimizer, reference) and optimizer.defaults["fused"] is True
    run(optimizer, params)
    run(reference(reference_params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, foreach=False), reference_params)
    for ours, theirs in zip(params, reference_params):
        torch.testing.assert_close(ours.data, theirs.data, rtol=1e-6, atol=1e-7)


def test_fused_in_every_float_dtype_on_cpu():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        params = make_params(dtype)
        optimizer = build_optimizer("AdamW", named(params), {})
        assert optimizer.defaults["fused"] is True, dtype
        run(optimizer, params, 2)


def test_unsupported_device_falls_back_silently():
    params = [torch.nn.Parameter(torch.empty(4, 4, device="meta"))]
    assert not fused_supported(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = build_optimizer("AdamW", named(params), {})
    assert not optimizer.defaults["fused"]


def test_amsgrad_stays_available():
    params = make_params()
    reference_params = clone(params)
    optimizer = build_optimizer("AdamW", named(params), {**CONFIG, "amsgrad": True})
    run(optimizer, params)
    run(
        torch.optim.AdamW(reference_params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True),
        reference_params,
    )
    for ours, theirs in zip(params, reference_params):
        torch.testing.assert_close(ours.data, theirs.data, rtol=1e-6, atol=1e-7)


def no_bias_correction_reference(params, grads_per_step, lr, betas, eps, weight_decay, adam_w_mode):
    """DeepSpeed's multi_tensor_adam.cu with bias_correction=0, written out element by element in
    float64: L2 mode adds decay * p to the gradient; AdamW mode adds decay * p to the update."""
    beta1, beta2 = betas
    values = [p.detach().double().clone() for p in params]
    moments = [(torch.zeros_like(v), torch.zeros_like(v)) for v in values]
    for grads in grads_per_step:
        for value, (m, v), grad in zip(values, moments, grads):
            g = grad.double()
            if not adam_w_mode:
                g = g + weight_decay * value
            m.copy_(beta1 * m + (1 - beta1) * g)
            v.copy_(beta2 * v + (1 - beta2) * g * g)
            update = m / (v.sqrt() + eps)
            if adam_w_mode:
                update = update + weight_decay * value
            value.copy_(value - lr * update)
    return values


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_no_bias_correction_matches_deepspeed_formula(adam_w_mode):
    params = make_params()
    optimizer = build_optimizer("Adam", named(params), {**CONFIG, "bias_correction": False, "adam_w_mode": adam_w_mode})
    assert isinstance(optimizer, DeepSpeedAdam)
    generator = torch.Generator().manual_seed(3)
    grads_per_step = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(10)]
    expected = no_bias_correction_reference(params, grads_per_step, 1e-2, (0.8, 0.99), 1e-8, 0.1, adam_w_mode)
    for grads in grads_per_step:
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
    for param, value in zip(params, expected):
        torch.testing.assert_close(param.data.double(), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_matches_deepspeed_cpu_adam(bias_correction, adam_w_mode):
    cpu_adam = pytest.importorskip("deepspeed.ops.adam")
    params = make_params()
    reference_params = clone(params)
    settings = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, bias_correction=bias_correction)
    try:
        reference = cpu_adam.DeepSpeedCPUAdam(reference_params, adamw_mode=adam_w_mode, **settings)
    except Exception as error:  # the op is compiled on first use; a machine without a compiler skips
        pytest.skip(f"DeepSpeedCPUAdam unavailable: {error}")
    ours = DeepSpeedAdam(params, adam_w_mode=adam_w_mode, **settings)
    run(ours, params)
    run(reference, reference_params)
    for mine, theirs in zip(params, reference_params):
        torch.testing.assert_close(mine.data, theirs.data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_deepspeed_adam_with_bias_correction_is_torch_bit_for_bit(adam_w_mode):
    params = make_params()
    reference_params = clone(params)
    run(DeepSpeedAdam(params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, adam_w_mode=adam_w_mode), params)
    reference = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    run(reference(reference_params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, foreach=False), reference_params)
    for ours, theirs in zip(params, reference_params):
        assert torch.equal(ours.data, theirs.data)


def test_adamw_ignores_adam_w_mode_false_like_deepspeed_but_says_so():
    params = make_params()
    with pytest.warns(UserWarning, match="adam_w_mode"):
        optimizer = build_optimizer("AdamW", named(params), {"adam_w_mode": False})
    assert isinstance(optimizer, torch.optim.AdamW)


@pytest.mark.parametrize(
    "name,config,message",
    [
        ("Adam", {"bias_correction": False, "amsgrad": True}, "amsgrad"),
        ("Adam", {"bias_correction": "no"}, "bias_correction"),
        ("Adam", {"adam_w_mode": 1}, "adam_w_mode"),
        ("Adam", {"bias_correction": False, "lr": -1.0}, "Invalid learning rate"),
        ("Adam", {"bias_correction": False, "betas": [0.9, 1.0]}, "Invalid beta parameter at index 1: 1.0"),
    ],
)
def test_bad_settings_are_one_clear_error(name, config, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(name, named(make_params()), config)


def test_deepspeed_adam_state_round_trips():
    import io

    params = make_params()
    optimizer = DeepSpeedAdam(params, lr=1e-2, bias_correction=False)
    run(optimizer, params, 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = clone(params)
    resumed = DeepSpeedAdam(resumed_params, lr=1e-2, bias_correction=False)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(optimizer, params, 3, seed=5)
    run(resumed, resumed_params, 3, seed=5)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a.data, b.data)
