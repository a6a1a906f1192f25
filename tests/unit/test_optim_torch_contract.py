"""CPUAdamW, GaLoreAdamW and FRUGAL keep torch.optim.Optimizer's contract where torch's own
AdamW does: its implementation switches, copies and pickles that step, state loaded into
parameters of another dtype, refusals of complex parameters and sparse gradients, param groups
added later, non-contiguous parameters, and torch's messages for bad hyperparameters."""

import copy
import pickle

import pytest
import torch

from memfit.optim import FRUGAL, CPUAdamW, GaLoreAdamW


def galore(params, **kwargs):
    return GaLoreAdamW([{"params": params, "rank": 2, "update_proj_gap": 2}], lr=0.01, **kwargs)


def frugal(params, **kwargs):
    return FRUGAL(
        [{"params": params, "projectable": True, "proj_type": "randomized", "density": 0.5}],
        lr=0.01,
        update_gap=2,
        **kwargs,
    )


def cpu_adamw(params, **kwargs):
    return CPUAdamW(params, lr=0.01, **kwargs)


BUILDERS = {"CPUAdamW": cpu_adamw, "GaLoreAdamW": galore, "FRUGAL": frugal}
NO_FUSED = ["GaLoreAdamW", "FRUGAL"]


def matrix(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(6, 4, generator=generator).to(dtype))


def take_steps(optimizer, params, num_steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step()


@pytest.mark.parametrize("name", BUILDERS)
def test_torch_implementation_switches(name):
    build = BUILDERS[name]
    for foreach in (None, False, True):
        build([matrix()], foreach=foreach)
    build([matrix()], fused=False)
    with pytest.raises(ValueError, match=rf"^differentiable=True: {name} steps under torch.no_grad"):
        build([matrix()], differentiable=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        build([matrix()], foreach=True, fused=True)
    if name in NO_FUSED:
        with pytest.raises(ValueError, match=rf"^fused=True: {name} has no fused implementation"):
            build([matrix()], fused=True)
    else:
        build([matrix()], fused=True)


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_settings_and_step_like_the_original(name, how):
    param = matrix()
    optimizer = BUILDERS[name]([param])
    take_steps(optimizer, [param], 3)
    if how == "deepcopy":
        twin_param, twin = copy.deepcopy((param, optimizer))  # one memo: the copy steps the copied tensor
    else:
        twin = pickle.loads(pickle.dumps(optimizer))
        twin_param = twin.param_groups[0]["params"][0]
    public = {key for key in vars(optimizer) if not key.startswith("_")}
    assert public == {key for key in vars(twin) if not key.startswith("_")}
    take_steps(optimizer, [param], 3, seed=7)
    take_steps(twin, [twin_param], 3, seed=7)
    assert torch.equal(param, twin_param)


@pytest.mark.parametrize("name", ["GaLoreAdamW", "FRUGAL"])
@pytest.mark.parametrize("plain", [False, True])
def test_fp32_state_loads_into_bf16_parameters(name, plain):
    if plain:  # a group that is not projected: plain AdamW moments
        builders = {"GaLoreAdamW": lambda p: GaLoreAdamW(p), "FRUGAL": lambda p: FRUGAL(p)}
    else:
        builders = BUILDERS
    with pytest.warns() if plain else _nothing():
        saved = builders[name]([matrix()])
    take_steps(saved, saved.param_groups[0]["params"], 3)
    bf16 = matrix(torch.bfloat16)
    with pytest.warns() if plain else _nothing():
        loaded = builders[name]([bf16])
    loaded.load_state_dict(saved.state_dict())
    before = bf16.detach().clone()
    take_steps(loaded, [bf16], 2)
    assert bf16.dtype == torch.bfloat16 and not torch.equal(bf16, before)
    assert loaded.state[bf16]["exp_avg"].dtype == torch.float32  # the saved precision is kept


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", ["GaLoreAdamW", "FRUGAL"])
def test_complex_parameters_are_refused(name):
    param = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=rf"^params: {name} does not support complex parameters"):
        BUILDERS[name]([param])
    optimizer = BUILDERS[name]([matrix()])
    with pytest.raises(ValueError, match="complex"):
        optimizer.add_param_group({"params": [param]})


@pytest.mark.parametrize("name", ["GaLoreAdamW", "FRUGAL"])
def test_sparse_gradients_are_one_clear_error(name):
    param = matrix()
    optimizer = BUILDERS[name]([param])
    param.grad = torch.eye(6, 4).to_sparse()
    with pytest.raises(RuntimeError, match=rf"^{name} does not support sparse gradients$"):
        optimizer.step()


def test_galore_group_added_later_steps_like_one_built_in():
    first, second = matrix(seed=1), matrix(seed=2)
    built_in = GaLoreAdamW([{"params": [first], "rank": 2, "update_proj_gap": 2}], lr=0.01)
    added = GaLoreAdamW([{"params": [matrix(seed=3)], "rank": 2}], lr=0.01)
    added.add_param_group({"params": [second], "rank": 2, "update_proj_gap": 2})
    with torch.no_grad():
        second.copy_(first)
    generator = torch.Generator().manual_seed(5)
    for _ in range(6):
        grad = torch.randn(6, 4, generator=generator)
        first.grad, second.grad = grad.clone(), grad.clone()
        built_in.step()
        added.step()
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_adamw_steps_non_contiguous_parameters(dtype):
    dense = matrix(dtype)
    strided = torch.nn.Parameter(dense.detach().t().contiguous().t())
    assert not strided.is_contiguous()
    optimizers = CPUAdamW([dense], lr=0.01), CPUAdamW([strided], lr=0.01)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        grad = torch.randn(6, 4, generator=generator).to(dtype)
        dense.grad, strided.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(dense, strided) and not strided.is_contiguous()


def test_cpu_adamw_load_adds_no_group_keys():
    param = matrix()
    optimizer = CPUAdamW([param])
    take_steps(optimizer, [param], 1)
    keys = set(optimizer.param_groups[0])
    optimizer.load_state_dict(optimizer.state_dict())
    assert set(optimizer.param_groups[0]) == keys and "differentiable" not in optimizer.defaults


@pytest.mark.parametrize("cls", [CPUAdamW, GaLoreAdamW, FRUGAL, torch.optim.AdamW])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
        (dict(betas=(1.0, 0.0)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.5)), "Invalid beta parameter at index 1: -0.5"),
        (dict(weight_decay=-1), "Invalid weight_decay value: -1"),
    ],
)
def test_bad_hyperparameters_give_torch_messages(cls, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        cls([matrix()], **kwargs)
