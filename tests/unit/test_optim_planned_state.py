"""planned_state_bytes(): the optimizer state, computed from shapes and settings before the first
step, equals state_bytes() once every parameter has taken a step."""

import itertools
import warnings

import pytest
import torch

from memfit.optim import FRUGAL, GaLoreAdamW

MATRICES = [(16, 40), (40, 16), (24, 24), (1, 7), (7, 1), (0, 5), (3, 200)]


def make_params(param_dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    matrices = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(param_dtype)) for shape in MATRICES]
    vector = torch.nn.Parameter(torch.randn(9, generator=generator).to(param_dtype))
    return matrices, vector


def step(optimizer, params, num_steps=1):
    for _ in range(num_steps):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()


@pytest.mark.parametrize(
    "projector,proj_type,compat",
    list(itertools.product(["svd", "randomized", "random"], ["std", "reverse_std", "left", "right"], [False, True])),
)
@pytest.mark.parametrize("param_dtype,proj_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_galore_planned_equals_state_after_first_step(projector, proj_type, compat, param_dtype, proj_dtype):
    matrices, vector = make_params(param_dtype)
    groups = [{"params": [vector]}, {"params": matrices, "rank": 6, "proj_type": proj_type, "projector": projector}]
    optimizer = GaLoreAdamW(groups, galore_compat=compat, proj_dtype=proj_dtype)
    planned = optimizer.planned_state_bytes()
    assert optimizer.state_bytes() == 0 and planned > 0
    step(optimizer, matrices + [vector])
    assert optimizer.state_bytes() == planned
    step(optimizer, matrices + [vector], 3)
    assert optimizer.planned_state_bytes() == planned == optimizer.state_bytes()


def test_galore_planned_matches_the_formula():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 40), (40, 16), (24, 24)]]
    optimizer = GaLoreAdamW([{"params": params, "rank": 6}])
    # std: moments on the larger side (2 x max x r), the basis on the smaller (min x r), fp32
    assert optimizer.planned_state_bytes() == sum(2 * max(s) * 6 + min(s) * 6 for s in [(16, 40)] * 2 + [(24, 24)]) * 4


@pytest.mark.parametrize("proj_type", ["blockwise", "svd", "randomized", "random"])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_frugal_planned_equals_state_after_first_step(proj_type, density, param_dtype):
    matrices, vector = make_params(param_dtype)
    optimizer = FRUGAL(
        [{"params": [vector]}, {"params": matrices, "projectable": True}],
        density=density,
        proj_type=proj_type,
        update_gap=3,
    )
    planned = optimizer.planned_state_bytes()
    assert optimizer.state_bytes() == 0
    step(optimizer, matrices + [vector])
    assert optimizer.state_bytes() == planned
    step(optimizer, matrices + [vector])  # inside the same period: the active set stays
    assert optimizer.planned_state_bytes() == optimizer.state_bytes() == planned


def test_plain_groups_count_full_adam_state():
    param = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        galore, frugal = GaLoreAdamW([param]), FRUGAL([param])
    assert galore.planned_state_bytes() == frugal.planned_state_bytes() == 2 * 15 * 2
