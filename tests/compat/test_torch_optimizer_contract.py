"""Checks modelled on PyTorch's generic optimizer tests (test/test_optim.py over
torch/testing/_internal/common_optimizers.py), re-written in memfit's own code and run on
CPUAdamW, GaLoreAdamW and FRUGAL, and on torch's AdamW as the reference the checks must hold for.
The test names follow PyTorch's. Deliberate differences are marked where they occur: complex
parameters are refused rather than handled, maximize/capturable are not accepted, and a tensor lr
is accepted with foreach=True (memfit has no foreach path to refuse)."""

import copy
import io
import warnings

import pytest
import torch

from memfit.optim import FRUGAL, CPUAdamW, GaLoreAdamW, NothingProjectedWarning


def _grouped(params_or_groups):
    if torch.is_tensor(params_or_groups):
        return params_or_groups  # what torch refuses; passed on so the optimizer refuses it
    groups = list(params_or_groups)
    if any(isinstance(item, tuple) for item in groups):
        return groups  # named parameters, passed on as given
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [dict(group, params=list(group["params"])) for group in groups]


def galore(params, **kwargs):
    groups = _grouped(params)
    for group in groups if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else []:
        if all(p.dim() == 2 for p in group["params"]):
            group.setdefault("rank", 2)
            group.setdefault("update_proj_gap", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingProjectedWarning)  # a 1-D-only model has nothing to project
        return GaLoreAdamW(groups, **kwargs)


def frugal(params, **kwargs):
    groups = _grouped(params)
    for group in groups if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else []:
        if all(p.dim() == 2 for p in group["params"]):
            group.setdefault("projectable", True)
            group.setdefault("proj_type", "randomized")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingProjectedWarning)
        return FRUGAL(groups, **{"update_gap": 3, **kwargs})


OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,  # the reference: every check holds for torch's own optimizer
    "CPUAdamW": CPUAdamW,
    "GaLoreAdamW": galore,
    "FRUGAL": frugal,
}
MEMFIT = ["CPUAdamW", "GaLoreAdamW", "FRUGAL"]


@pytest.fixture(params=list(OPTIMIZERS))
def name(request):
    return request.param


def weight_and_bias(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(6, 4, generator=generator).to(dtype))
    bias = torch.nn.Parameter(torch.randn(6, generator=generator).to(dtype))
    return weight, bias


def loss_of(weight, bias, seed=1):
    x = torch.randn(4, generator=torch.Generator().manual_seed(seed)).to(weight.dtype)
    return (weight.mv(x) + bias).pow(2).sum()


def closure_for(optimizer, weight, bias):
    def closure():
        optimizer.zero_grad()
        loss = loss_of(weight, bias)
        loss.backward()
        return loss

    return closure


def test_optimizer_can_be_printed(name):
    weight, bias = weight_and_bias()
    text = repr(OPTIMIZERS[name]([weight, bias], lr=0.01))
    assert "Parameter Group 0" in text and "lr: 0.01" in text


ERRORS = [
    ("invalid param type", lambda w, b: dict(params=w), TypeError, "params argument given to the optimizer"),
    (
        "duplicates across groups",
        lambda w, b: dict(params=[{"params": [w]}, {"params": [w]}]),
        ValueError,
        "some parameters appear in more than one parameter group",
    ),  # fmt: skip
    (
        "tensor lr of 2 elements",
        lambda w, b: dict(params=[w], lr=torch.tensor([0.1, 0.1])),
        ValueError,
        "Tensor lr must be 1-element",
    ),  # fmt: skip
    (
        "beta1 out of range",
        lambda w, b: dict(params=[w], lr=1e-2, betas=(1.0, 0.0)),
        ValueError,
        "Invalid beta parameter at index 0: 1.0",
    ),  # fmt: skip
    (
        "negative weight decay",
        lambda w, b: dict(params=[w], lr=1e-2, weight_decay=-1),
        ValueError,
        "Invalid weight_decay value: -1",
    ),  # fmt: skip
    (
        "names on some params only",
        lambda w, b: dict(params=[("weight", w), b]),
        ValueError,
        "all optimizer params should be with/without names",
    ),  # fmt: skip
    (
        "fused with foreach",
        lambda w, b: dict(params=[w], foreach=True, fused=True),
        RuntimeError,
        "`fused` and `foreach` cannot be `True` together",
    ),  # fmt: skip
]


@pytest.mark.parametrize("case, arguments, error, message", ERRORS, ids=[case[0] for case in ERRORS])
def test_errors(name, case, arguments, error, message):
    weight, bias = weight_and_bias()
    kwargs = arguments(weight, bias)
    if case == "fused with foreach" and name == "AdamW":
        kwargs["params"] = [torch.nn.Parameter(torch.zeros(()))]
    with pytest.raises(error, match=message):
        OPTIMIZERS[name](kwargs.pop("params"), **kwargs)


def test_duplicate_parameters_in_a_group_warn(name):
    weight, _ = weight_and_bias()
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        OPTIMIZERS[name]([weight, weight])


def test_forloop_goes_right_direction(name):
    weight, bias = weight_and_bias()
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    closure = closure_for(optimizer, weight, bias)
    initial = closure().item()
    for _ in range(20):
        optimizer.step(closure)
    assert closure().item() < initial


def test_non_contiguous_parameters_go_right_direction(name):
    weight = torch.nn.Parameter(torch.randn(6, 4, 2)[..., 0])
    bias = torch.nn.Parameter(torch.randn(6, 2)[..., 0])
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    closure = closure_for(optimizer, weight, bias)
    initial = closure().item()
    for _ in range(20):
        optimizer.step(closure)
    assert closure().item() < initial and not weight.is_contiguous()


@pytest.mark.parametrize("schedule", ["StepLR", "ReduceLROnPlateau"])
def test_param_group_with_lrscheduler_goes_right_direction(name, schedule):
    weight, bias = weight_and_bias()
    optimizer = OPTIMIZERS[name]([{"params": [weight]}, {"params": [bias], "lr": 0.02}], lr=0.01)
    if schedule == "StepLR":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.9)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=1)
    closure = closure_for(optimizer, weight, bias)
    initial = closure().item()
    for _ in range(20):
        loss = optimizer.step(closure)
        scheduler.step(loss) if schedule == "ReduceLROnPlateau" else scheduler.step()
    assert closure().item() < initial


def test_param_groups_lr(name):
    weight, bias = weight_and_bias()
    optimizer = OPTIMIZERS[name]([{"params": [weight]}, {"params": [bias], "lr": 0.0}], lr=0.01, weight_decay=0.0)
    bias_before = bias.detach().clone()
    closure = closure_for(optimizer, weight, bias)
    initial = closure().item()
    for _ in range(10):
        optimizer.step(closure)
    assert torch.equal(bias, bias_before) and closure().item() < initial


def test_param_groups_weight_decay(name):
    weight, bias = weight_and_bias()
    optimizer = OPTIMIZERS[name]([{"params": [weight], "weight_decay": 0.1}, {"params": [bias]}], lr=0.01)
    closure = closure_for(optimizer, weight, bias)
    initial = closure().item()
    for _ in range(20):
        optimizer.step(closure)
    assert closure().item() < initial


def test_tensor_lr(name):
    runs = []
    for lr in (0.01, torch.tensor(0.01)):
        weight, bias = weight_and_bias()
        optimizer = OPTIMIZERS[name]([weight, bias], lr=lr)
        closure = closure_for(optimizer, weight, bias)
        for _ in range(5):
            optimizer.step(closure)
        runs.append((weight.detach(), bias.detach()))
    torch.testing.assert_close(runs[0], runs[1])


def test_step_is_noop_when_params_have_no_grad(name):
    weight, bias = weight_and_bias()
    before = [weight.detach().clone(), bias.detach().clone()]
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    for _ in range(3):
        optimizer.step()
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])


def test_step_is_noop_for_zero_grads(name):
    weight, bias = weight_and_bias()
    before = [weight.detach().clone(), bias.detach().clone()]
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01, weight_decay=0.0)
    for _ in range(3):
        weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
        optimizer.step()
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])


def test_non_empty_state(name):
    weight, bias = weight_and_bias()
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    optimizer.step(closure_for(optimizer, weight, bias))
    assert all(optimizer.state[param] for param in (weight, bias))


def same(a, b) -> bool:
    """Equal, tensor by tensor, through nested dicts and lists (torch's assertEqual on state dicts)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def primed(name, seed=0, num_steps=7):
    weight, bias = weight_and_bias(seed)
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    closure = closure_for(optimizer, weight, bias)
    for _ in range(num_steps):
        optimizer.step(closure)
    return optimizer, weight, bias


def clone_with_state(name, optimizer, weight, bias, state_dict):
    weight_c = torch.nn.Parameter(weight.detach().clone())
    bias_c = torch.nn.Parameter(bias.detach().clone())
    optimizer_c = OPTIMIZERS[name]([weight_c, bias_c], lr=0.01)
    optimizer_c.load_state_dict(state_dict)
    return optimizer_c, weight_c, bias_c


def run_in_lockstep(name, optimizer, weight, bias, optimizer_c, weight_c, bias_c, num_steps=7):
    closure, closure_c = closure_for(optimizer, weight, bias), closure_for(optimizer_c, weight_c, bias_c)
    for _ in range(num_steps):
        optimizer.step(closure)
        optimizer_c.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)


def test_state_dict_deterministic(name):
    optimizer, weight, bias = primed(name)
    saved = copy.deepcopy(optimizer.state_dict())
    clone = clone_with_state(name, optimizer, weight, bias, copy.deepcopy(saved))
    run_in_lockstep(name, optimizer, weight, bias, *clone)
    assert same(optimizer.state_dict(), clone[0].state_dict())


def test_load_does_not_modify_the_state_dict(name):
    optimizer, weight, bias = primed(name)
    state_dict, loaded = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(optimizer.state_dict())
    clone_with_state(name, optimizer, weight, bias, loaded)
    assert same(state_dict, loaded)


def test_save_load_equality_with_weights_only(name):
    optimizer, weight, bias = primed(name)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    run_in_lockstep(name, optimizer, weight, bias, *clone_with_state(name, optimizer, weight, bias, loaded))


def test_load_nontensor_step(name):
    optimizer, weight, bias = primed(name)
    state_dict = copy.deepcopy(optimizer.state_dict())
    for state in state_dict["state"].values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].item()
    run_in_lockstep(name, optimizer, weight, bias, *clone_with_state(name, optimizer, weight, bias, state_dict))


def test_can_load_older_state_dict(name):
    optimizer, weight, bias = primed(name)
    state_dict = copy.deepcopy(optimizer.state_dict())
    for group in state_dict["param_groups"]:
        for key in ("foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"):
            group.pop(key, None)
    run_in_lockstep(name, optimizer, weight, bias, *clone_with_state(name, optimizer, weight, bias, state_dict))


def test_deepcopy_copies_all_public_attrs(name):
    optimizer, _, _ = primed(name)
    public = {key for key in vars(optimizer) if not key.startswith("_")}
    assert public == {key for key in vars(copy.deepcopy(optimizer)) if not key.startswith("_")}


def test_step_all_hooks(name):
    optimizer, weight, bias = primed(name, num_steps=0)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.step(closure_for(optimizer, weight, bias))
    assert calls == ["pre", "post"]


def test_state_dict_and_load_hooks(name):
    optimizer, weight, bias = primed(name)
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("sd pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("sd post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == ["sd pre", "sd post", "load pre", "load post"]


def test_zero_grad(name):
    optimizer, weight, bias = primed(name, num_steps=1)
    optimizer.zero_grad()
    assert weight.grad is None and bias.grad is None
    loss_of(weight, bias).backward()
    optimizer.zero_grad(set_to_none=False)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_add_param_group_then_step(name):
    weight, bias = weight_and_bias()
    optimizer = OPTIMIZERS[name]([weight], lr=0.01)
    optimizer.add_param_group({"params": [bias], "lr": 0.02})
    assert optimizer.param_groups[1]["lr"] == 0.02
    assert optimizer.param_groups[1].keys() >= optimizer.param_groups[0].keys() - {"params"}
    closure = closure_for(optimizer, weight, bias)
    initial = closure().item()
    for _ in range(10):
        optimizer.step(closure)
    assert closure().item() < initial


def test_mixed_dtypes(name):
    weight, _ = weight_and_bias(dtype=torch.bfloat16)
    _, bias = weight_and_bias()
    optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01)
    before = weight.detach().clone()
    for _ in range(3):
        weight.grad, bias.grad = torch.ones_like(weight), torch.ones_like(bias)
        optimizer.step()
    assert weight.dtype == torch.bfloat16 and not torch.equal(weight, before)


def test_foreach_matches_forloop(name):
    runs = []
    for foreach in (False, True):
        weight, bias = weight_and_bias()
        optimizer = OPTIMIZERS[name]([weight, bias], lr=0.01, foreach=foreach)
        closure = closure_for(optimizer, weight, bias)
        for _ in range(5):
            optimizer.step(closure)
        runs.append((weight.detach(), bias.detach()))
    torch.testing.assert_close(runs[0], runs[1])


@pytest.mark.parametrize("memfit_name", MEMFIT)
def test_complex_is_refused(memfit_name):
    # deliberate difference, kept for correctness: torch's AdamW steps complex parameters as their
    # real views; CPUAdamW's kernel has no complex path, and GaLore's and FRUGAL's projections of a
    # real view would mix real and imaginary parts, so memfit's optimizers refuse them
    param = torch.nn.Parameter(torch.randn(5, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex|torch.complex64"):
        OPTIMIZERS[memfit_name]([param])


@pytest.mark.parametrize("memfit_name", MEMFIT)
def test_sparse_gradients_are_refused(memfit_name):
    # as torch's AdamW, which refuses a sparse gradient too (not a difference)
    weight, bias = weight_and_bias()
    optimizer = OPTIMIZERS[memfit_name]([weight, bias], lr=0.01)
    weight.grad, bias.grad = torch.eye(6, 4).to_sparse(), torch.ones(6)
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        optimizer.step()


@pytest.mark.parametrize("memfit_name", MEMFIT)
@pytest.mark.parametrize("option", ["maximize", "capturable"])
def test_maximize_and_capturable_are_not_accepted(memfit_name, option):
    # deliberate difference: not implemented, so not accepted (a TypeError). maximize would have to
    # reach the fused CPU kernel and the engine's kernel update paths; capturable is for CUDA graph
    # capture, which memfit does not do
    weight, bias = weight_and_bias()
    with pytest.raises(TypeError, match=option):
        OPTIMIZERS[memfit_name]([weight, bias], **{option: True})


@pytest.mark.parametrize("memfit_name", MEMFIT)
def test_differentiable_is_refused(memfit_name):
    weight, bias = weight_and_bias()
    with pytest.raises(ValueError, match="differentiable=True"):
        OPTIMIZERS[memfit_name]([weight, bias], differentiable=True)
