"""GaLoreAdamW and FRUGAL state comes back from a state dict in the dtype it was saved in (torch's
load_state_dict would cast it to the parameter's dtype), and a group added later is validated
like the constructor's groups."""

import io

import pytest
import torch

from memfit.optim import FRUGAL, GaLoreAdamW, frugal_param_groups, galore_param_groups

TARGETS = ("attn", "mlp")  # both layers of Block: the default would leave its input and output layers
FACTORIES = {
    "galore": lambda model, **kw: GaLoreAdamW(
        galore_param_groups(model, rank=4, target_modules=TARGETS, update_proj_gap=2), lr=1e-2, **kw
    ),
    "galore-bf16-basis": lambda model: GaLoreAdamW(
        galore_param_groups(model, rank=4, target_modules=TARGETS, update_proj_gap=2),
        lr=1e-2,
        proj_dtype=torch.bfloat16,
    ),
    "frugal-blockwise": lambda model: FRUGAL(frugal_param_groups(model, TARGETS), lr=1e-2, density=0.5, update_gap=2),
    "frugal-svd": lambda model: FRUGAL(
        frugal_param_groups(model, TARGETS), lr=1e-2, density=0.5, update_gap=2, proj_type="svd"
    ),
}


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(16, 24)
        self.mlp = torch.nn.Linear(24, 8)

    def forward(self, x):
        return self.mlp(torch.tanh(self.attn(x)))


def make(dtype):
    torch.manual_seed(0)
    return Block().to(dtype)


def train(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        inputs = torch.randn(4, 16, generator=generator).to(dtype)
        model(inputs).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def state_dtypes(optimizer):
    return [{k: v.dtype for k, v in s.items() if torch.is_tensor(v)} for s in optimizer.state.values()]


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_keeps_state_dtypes_and_is_bit_identical(name, dtype):
    model = make(dtype)
    optimizer = FACTORIES[name](model)
    train(model, optimizer, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    saved_dtypes = state_dtypes(optimizer)
    train(model, optimizer, 3, seed=2)  # the run that never stopped

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make(dtype)
    resumed_model.load_state_dict(saved["model"])
    resumed = FACTORIES[name](resumed_model)
    resumed.load_state_dict(saved["optimizer"])
    assert state_dtypes(resumed) == saved_dtypes
    train(resumed_model, resumed, 3, seed=2)
    for (key, expected), got in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(expected, got), key


def test_galore_add_param_group_is_validated():
    optimizer = GaLoreAdamW([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3)
    with pytest.raises(ValueError, match="a group with 'rank' may hold only 2-D tensors"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))], "rank": 2})
    with pytest.raises(ValueError, match="Invalid proj_type: 'bogus'"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 2, "proj_type": "bogus"})
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "lr": -1})


def test_frugal_add_param_group_is_validated():
    optimizer = FRUGAL([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3)
    with pytest.raises(ValueError, match="Invalid proj_type: 'bogus'"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "proj_type": "bogus"})
    with pytest.raises(ValueError, match="Invalid density: 2"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "density": 2})
    with pytest.raises(ValueError, match="proj_type 'svd' needs 2-D tensors"):
        optimizer.add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(4))], "projectable": True, "proj_type": "svd"}
        )


@pytest.mark.parametrize("cls", [GaLoreAdamW, FRUGAL])
def test_group_hyperparameters_given_as_strings_are_refused(cls):
    with pytest.raises(ValueError, match="Invalid learning rate: '0.1'"):
        cls([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "lr": "0.1"}])
