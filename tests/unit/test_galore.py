"""GaLoreAdamW against torch.optim.AdamW, galore-torch, and the projector invariants."""

import io

import pytest
import torch

import memfit.optim.galore as galore_module
from memfit.optim import FRUGAL, GaLoreAdamW, galore_param_groups
from memfit.optim.groups import NothingProjectedWarning
from memfit.optim.projectors import LEFT, RIGHT, compute_basis, project, project_back

SHAPES = [(16, 40), (40, 16), (24, 24)]


def grads_for(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def run(optimizer, params, grads_per_param):
    for step_grads in zip(*grads_per_param):
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        optimizer.step()


def test_permutation_projector_equals_adamw(monkeypatch):
    """With a full-rank permutation basis and scale 1, the projected Adam is plain AdamW."""

    def permutation_basis(grad, side, rank, method, **kwargs):
        size = grad.shape[0] if side == LEFT else grad.shape[1]
        perm = torch.eye(size)[torch.randperm(size, generator=torch.Generator().manual_seed(size))]
        return perm if side == LEFT else perm.t().contiguous()

    monkeypatch.setattr(galore_module, "compute_basis", permutation_basis)
    for shape in SHAPES:
        torch.manual_seed(0)
        ours, reference = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
        reference.data.copy_(ours.data)
        optimizer = GaLoreAdamW(
            [{"params": [ours], "rank": min(shape), "update_proj_gap": 4, "scale": 1.0}], lr=1e-2, weight_decay=0.1
        )
        torch_adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1)
        grads = grads_for(shape, 12)
        run(optimizer, [ours], [grads])
        run(torch_adamw, [reference], [grads])
        torch.testing.assert_close(ours.data, reference.data, rtol=1e-6, atol=1e-7)


def test_plain_groups_equal_adamw_exactly():
    torch.manual_seed(0)
    ours, reference = torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(7, 5))
    reference.data.copy_(ours.data)
    grads = grads_for((7, 5), 10)
    with pytest.warns(NothingProjectedWarning):
        optimizer = GaLoreAdamW([ours], lr=1e-2, weight_decay=0.05)
    run(optimizer, [ours], [grads])
    run(torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.05, foreach=False), [reference], [grads])
    assert torch.equal(ours.data, reference.data)


@pytest.mark.parametrize("shape,rank", [((16, 40), 4), ((40, 16), 4), ((24, 24), 8), ((16, 40), 32)])
def test_compat_matches_galore_torch(shape, rank):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(1)
    ours, theirs = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    theirs.data.copy_(ours.data)
    options = {"rank": rank, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}
    mine = GaLoreAdamW([{"params": [ours], **options}], lr=1e-2, eps=1e-6, weight_decay=0.1, galore_compat=True)
    reference = galore_torch.GaLoreAdamW([{"params": [theirs], **options}], lr=1e-2, eps=1e-6, weight_decay=0.1)
    grads = grads_for(shape, 12, seed=2)  # refreshes at steps 0, 5 and 10
    run(mine, [ours], [grads])
    run(reference, [theirs], [grads])
    torch.testing.assert_close(ours.data, theirs.data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["svd", "randomized", "random"])
@pytest.mark.parametrize("side", [LEFT, RIGHT])
def test_basis_is_orthonormal(method, side):
    grad = torch.randn(30, 50)
    basis = compute_basis(grad, side, 6, method, generator=torch.Generator().manual_seed(0))
    gram = basis.t() @ basis if side == LEFT else basis @ basis.t()
    torch.testing.assert_close(gram, torch.eye(6), atol=1e-5, rtol=0)


def decaying_matrix(rows, cols, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(cols, cols, generator=generator))[0]
    singular = 0.7 ** torch.arange(min(rows, cols), dtype=torch.float32)
    return (u[:, : len(singular)] * singular) @ v[:, : len(singular)].t(), singular


@pytest.mark.parametrize("side", [LEFT, RIGHT])
def test_svd_residual_is_eckart_young_and_randomized_is_close(side):
    grad, singular = decaying_matrix(40, 60)
    rank = 5
    optimal = singular[rank:].pow(2).sum().sqrt()
    for method, tolerance in (("svd", 1e-4), ("randomized", 1e-2)):
        basis = compute_basis(grad, side, rank, method, generator=torch.Generator().manual_seed(3))
        residual = grad - project_back(project(grad, basis, side), basis, side)
        assert abs(residual.norm() - optimal) / optimal <= tolerance, method


@pytest.mark.parametrize("projector,basis_elements", [("svd", True), ("randomized", True), ("random", False)])
def test_state_bytes_match_formula(projector, basis_elements):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    rank = 6
    optimizer = GaLoreAdamW([{"params": params, "rank": rank, "projector": projector}])
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    expected = sum(2 * max(shape) * rank + (min(shape) * rank if basis_elements else 0) for shape in SHAPES) * 4
    assert optimizer.state_bytes() == expected


@pytest.mark.parametrize("projector", ["svd", "randomized", "random"])
@pytest.mark.parametrize("moments", ["keep", "reset", "project"])
def test_resume_across_refresh_is_bit_identical(projector, moments):
    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
        groups = [
            {"params": params, "rank": 4, "update_proj_gap": 5, "projector": projector, "moments_on_refresh": moments}
        ]
        return params, GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01)

    grads = [grads_for(shape, 12, seed=i) for i, shape in enumerate(SHAPES)]
    straight_params, straight = make()
    run(straight, straight_params, grads)

    first_params, first = make()
    run(first, first_params, [g[:7] for g in grads])
    buffer = io.BytesIO()
    torch.save({"optimizer": first.state_dict(), "params": [p.detach() for p in first_params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True, map_location="cpu")
    resumed_params, resumed = make()
    for param, value in zip(resumed_params, saved["params"]):
        param.data.copy_(value)
    resumed.load_state_dict(saved["optimizer"])
    run(resumed, resumed_params, [g[7:] for g in grads])  # crosses the refresh at step 10
    for a, b in zip(resumed_params, straight_params):
        assert torch.equal(a.data, b.data)


def test_moment_modes_on_refresh():
    """Gradients that are positive multiples of one matrix keep the same (SVD) basis, so projecting the
    moments is a no-op (equals keep), while reset restarts them."""
    results = {}
    for mode in ("keep", "project", "reset"):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(20, 12))
        optimizer = GaLoreAdamW(
            [{"params": [param], "rank": 3, "update_proj_gap": 2, "moments_on_refresh": mode}],
            lr=1e-2,
            projector="svd",
        )
        grad = torch.randn(20, 12, generator=torch.Generator().manual_seed(5))
        for step in range(5):
            param.grad = grad * (1 + step)
            optimizer.step()
        results[mode] = param.detach().clone()
    torch.testing.assert_close(results["project"], results["keep"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results["reset"], results["keep"])


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_projection_runs_close_to_fp32(shape, param_dtype):
    outcomes = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(*shape).to(param_dtype))
        optimizer = GaLoreAdamW([{"params": [param], "rank": 8}], lr=1e-3, proj_dtype=dtype)
        for grad in grads_for(shape, 5):
            param.grad = grad.to(param_dtype)
            optimizer.step()
        outcomes.append(param.detach().float().clone())
        if dtype == torch.bfloat16:
            assert optimizer.state[param]["basis"].dtype == torch.bfloat16
    tolerance = 1e-3 if param_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outcomes[1], outcomes[0], rtol=0, atol=tolerance)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_basis_gemm_dtype_follows_the_hardware(monkeypatch, native):
    """A permutation basis is exact in bf16. Without native bf16 GEMM the matmuls run in fp32, so
    the step equals the fp32 projection bit for bit; with it, the gradient is rounded to bf16 and
    the result differs (but stays close)."""

    def permutation_basis(grad, side, rank, method, **kwargs):
        size = grad.shape[0] if side == LEFT else grad.shape[1]
        perm = torch.eye(size)[torch.randperm(size, generator=torch.Generator().manual_seed(size))][:, :rank]
        return perm if side == LEFT else perm.t().contiguous()

    monkeypatch.setattr(galore_module, "compute_basis", permutation_basis)
    monkeypatch.setattr(galore_module, "_cpu_has_native", lambda dtype: native)
    outcomes = {}
    for dtype in (torch.float32, torch.bfloat16):
        param = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)))
        optimizer = GaLoreAdamW([{"params": [param], "rank": 8}], lr=1e-2, proj_dtype=dtype)
        for grad in grads_for((24, 40), 4):
            param.grad = grad
            optimizer.step()
        assert optimizer.state[param]["basis"].dtype == dtype  # stored as asked either way
        outcomes[dtype] = param.detach().clone()
    if native:
        assert not torch.equal(outcomes[torch.bfloat16], outcomes[torch.float32])
        torch.testing.assert_close(outcomes[torch.bfloat16], outcomes[torch.float32], rtol=0, atol=1e-3)
    else:
        assert torch.equal(outcomes[torch.bfloat16], outcomes[torch.float32])


def test_invalid_proj_dtype_is_refused():
    with pytest.raises(ValueError, match="Invalid proj_dtype"):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(4, 4))], proj_dtype=torch.int8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1}, "Invalid learning rate"),
        ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
        ({"rank": 0}, "Invalid rank"),
        ({"rank": 4, "proj_type": "diagonal"}, "Invalid proj_type"),
        ({"rank": 4, "projector": "qr"}, "Invalid projector"),
        ({"rank": 4, "moments_on_refresh": "drop"}, "Invalid moments_on_refresh"),
        ({"rank": 4, "update_proj_gap": 0}, "Invalid update_proj_gap"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_one_dimensional_tensor_in_rank_group_is_refused():
    with pytest.raises(ValueError, match="only 2-D tensors"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(4))], "rank": 2}])


def test_param_groups_helper_picks_attention_and_mlp_matrices():
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(10, 8),
            "attn": torch.nn.Linear(8, 8),
            "mlp": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)),
            "lm_head": torch.nn.Linear(8, 10),
        }
    )
    plain, projected = galore_param_groups(model, rank=4)
    assert projected["names"] == ["attn.weight", "mlp.0.weight", "mlp.1.weight"] and projected["rank"] == 4
    assert "embed.weight" in plain["names"] and "attn.bias" in plain["names"] and "rank" not in plain
    GaLoreAdamW([plain, projected])  # accepted as is


def test_default_projector_is_randomized_and_compat_takes_svd():
    param = torch.nn.Parameter(torch.randn(8, 4))
    assert GaLoreAdamW([{"params": [param], "rank": 2}]).param_groups[0]["projector"] == "randomized"
    compat = GaLoreAdamW([{"params": [param], "rank": 2}], galore_compat=True)
    assert compat.param_groups[0]["projector"] == "svd"
    named = GaLoreAdamW([{"params": [param], "rank": 2, "projector": "random"}], galore_compat=True)
    assert named.param_groups[0]["projector"] == "random"


@pytest.mark.parametrize("make", [lambda p: GaLoreAdamW(p), lambda p: FRUGAL(p)])
def test_refused_param_group_is_not_kept(make):
    """A group that fails the checks leaves the optimizer as it was, so the same tensor can be
    added again with valid options."""
    with pytest.warns(NothingProjectedWarning):
        optimizer = make([torch.nn.Parameter(torch.randn(4, 4))])
    extra = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="Invalid"):
        optimizer.add_param_group({"params": [extra], "lr": -1.0})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": [extra], "lr": 0.1})
    assert len(optimizer.param_groups) == 2
