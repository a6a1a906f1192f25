"""FRUGAL against AdamW and signSGD references, its block choice, state accounting and resume."""

import io

import pytest
import torch

from memfit.optim import FRUGAL, LayerwiseStepper, frugal_param_groups
from memfit.optim.galore import GaLoreAdamW

SHAPES = [(16, 40), (40, 16), (24, 24), (8, 8)]


def make_params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES], torch.nn.Parameter(torch.randn(12))


def grads(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(shape, generator=generator) for shape in SHAPES] + [torch.randn(12, generator=generator)]
        for _ in range(steps)
    ]


def run(optimizer, params, steps_grads):
    for step_grads in steps_grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        optimizer.step()


def frugal(matrices, vector, **kwargs):
    return FRUGAL(
        [{"params": matrices, "projectable": True}, {"params": [vector]}], lr=1e-2, weight_decay=0.05, **kwargs
    )


@pytest.mark.parametrize("reset", [False, True])
def test_density_one_equals_adamw(reset):
    matrices, vector = make_params()
    ref_matrices, ref_vector = make_params()
    steps = grads(9 if reset else 12)  # with reset, stay inside one subspace period
    run(
        frugal(matrices, vector, density=1.0, update_gap=4 if not reset else 10, reset_state_on_refresh=reset),
        matrices + [vector],
        steps,
    )
    run(
        torch.optim.AdamW(ref_matrices + [ref_vector], lr=1e-2, weight_decay=0.05, foreach=False),
        ref_matrices + [ref_vector],
        steps,
    )
    for ours, reference in zip(matrices + [vector], ref_matrices + [ref_vector]):
        assert torch.equal(ours.data, reference.data)


def test_density_zero_is_signsgd_plus_adamw():
    matrices, vector = make_params()
    ref_matrices, ref_vector = make_params()
    steps = grads(6)
    run(frugal(matrices, vector, density=0.0, state_free_lr_scale=0.5), matrices + [vector], steps)
    adamw = torch.optim.AdamW([ref_vector], lr=1e-2, weight_decay=0.05, foreach=False)
    for step_grads in steps:
        with torch.no_grad():
            for param, grad in zip(ref_matrices, step_grads):
                param.mul_(1 - 1e-2 * 0.05).add_(torch.sign(grad), alpha=-1e-2 * 0.5)
        ref_vector.grad = step_grads[-1].clone()
        adamw.step()
    for ours, reference in zip(matrices + [vector], ref_matrices + [ref_vector]):
        assert torch.equal(ours.data, reference.data)


def test_blockwise_tracks_density_by_bytes_and_cycles():
    matrices, vector = make_params()
    optimizer = frugal(matrices, vector, density=0.5, update_gap=2)
    total = sum(p.numel() for p in matrices)
    seen_active = set()
    for step_grads in grads(16):
        for param, grad in zip(matrices + [vector], step_grads):
            param.grad = grad
        optimizer.step()
        active = [i for i, p in enumerate(matrices) if optimizer.state[p].get("active")]
        seen_active.update(active)
        assert 0.5 * total - 640 <= sum(matrices[i].numel() for i in active) <= 0.5 * total + 640  # within a tensor
        adam_bytes = sum(
            v.numel() * 4 for p in matrices for k, v in optimizer.state[p].items() if k.startswith("exp_avg")
        )
        assert adam_bytes == 8 * sum(matrices[i].numel() for i in active)
    assert seen_active == set(range(len(matrices)))  # every tensor gets its turn


def test_state_bytes_blockwise():
    matrices, vector = make_params()
    optimizer = frugal(matrices, vector, density=0.25)
    run(optimizer, matrices + [vector], grads(1))
    active_numel = sum(p.numel() for p in matrices if optimizer.state[p]["active"])
    assert optimizer.state_bytes() == 8 * active_numel + 8 * vector.numel()


def test_subspace_step_matches_formula():
    """One svd step: Adam on the projection, signSGD on the residual (first step: Adam = sign)."""
    from memfit.optim.projectors import compute_basis, project, project_back

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(30, 20))
    start = param.detach().clone()
    grad = torch.randn(30, 20)
    optimizer = FRUGAL([{"params": [param], "projectable": True}], lr=0.1, density=0.25, proj_type="svd")
    param.grad = grad.clone()
    optimizer.step()
    basis = compute_basis(grad, 1, 5, "svd")  # std on a tall matrix: right side, rank 0.25 x 20
    low = project(grad, basis, 1)
    adam = low / (low.abs() + 1e-8)  # first Adam step with bias correction
    expected = start - 0.1 * project_back(adam, basis, 1) - 0.1 * torch.sign(grad - project_back(low, basis, 1))
    torch.testing.assert_close(param.data, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("proj_type", ["blockwise", "svd", "random"])
def test_resume_across_refresh_is_bit_identical(proj_type):
    def make():
        matrices, vector = make_params()
        return matrices + [vector], frugal(matrices, vector, density=0.5, update_gap=4, proj_type=proj_type)

    steps = grads(11)
    straight_params, straight = make()
    run(straight, straight_params, steps)
    first_params, first = make()
    run(first, first_params, steps[:6])
    buffer = io.BytesIO()
    torch.save({"optimizer": first.state_dict(), "params": [p.detach() for p in first_params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params, resumed = make()
    for param, value in zip(resumed_params, saved["params"]):
        param.data.copy_(value)
    resumed.load_state_dict(saved["optimizer"])
    run(resumed, resumed_params, steps[6:])
    for a, b in zip(resumed_params, straight_params):
        assert torch.equal(a.data, b.data)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"density": 1.5}, "Invalid density"),
        ({"update_gap": 0}, "Invalid update_gap"),
        ({"proj_type": "columns"}, "Invalid proj_type"),
        ({"state_free": "lion"}, "Invalid state_free"),
        ({"lr": -0.1}, "Invalid learning rate"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FRUGAL([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_param_groups_helper_with_target_modules():
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})
    plain, projectable = frugal_param_groups(model, target_modules=["attn"])
    assert projectable["names"] == ["attn.weight"] and projectable["projectable"]
    assert plain["names"] == ["attn.bias", "norm.weight", "norm.bias"]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-2),
        lambda params: GaLoreAdamW([{"params": params, "rank": 2}] if params[0].dim() == 2 else params, lr=1e-2),
    ],
)
def test_layerwise_with_accumulation_equals_normal_mode(make_optimizer):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)) for _ in range(12)]
    accumulation = 3

    normal = model()
    optimizers = [make_optimizer([p]) for p in normal.parameters()]
    for index, (x, y) in enumerate(batches):
        (torch.nn.functional.mse_loss(normal(x), y) / accumulation).backward()
        if (index + 1) % accumulation == 0:
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()

    layerwise = model()
    stepper = LayerwiseStepper(layerwise, make_optimizer, grad_accum_steps=accumulation)
    for x, y in batches:
        (torch.nn.functional.mse_loss(layerwise(x), y) / accumulation).backward()
    for a, b in zip(layerwise.parameters(), normal.parameters()):
        torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=1e-7)
        assert a.grad is None  # freed at each step
    assert stepper.state_bytes() > 0


def test_layerwise_refuses_clipping():
    with pytest.raises(ValueError, match="not possible in layer-wise mode"):
        LayerwiseStepper(torch.nn.Linear(2, 2), lambda p: torch.optim.SGD(p, lr=0.1), 2, gradient_clipping=1.0)


@pytest.mark.parametrize("proj_type", ["svd", "random"])
def test_a_tensor_whose_first_gradient_comes_between_refreshes_gets_its_subspace_then(proj_type):
    """A step where a tensor has no gradient (a step without backward, a layer used on some steps
    only) still counts towards update_gap; the tensor's first gradient, on a step that is not a
    refresh, makes its subspace then instead of failing, and steps as on a refresh."""
    torch.manual_seed(0)
    late = torch.nn.Parameter(torch.randn(30, 20))
    fresh = torch.nn.Parameter(late.detach().clone())
    grad = torch.randn(30, 20)
    options = {"lr": 0.1, "density": 0.25, "proj_type": proj_type, "update_gap": 4}
    optimizer = FRUGAL([{"params": [late], "projectable": True}], **options)
    optimizer.step()  # no gradient: not a refresh for the next step
    late.grad = grad.clone()
    optimizer.step()
    reference = FRUGAL([{"params": [fresh], "projectable": True}], **options)
    fresh.grad = grad.clone()
    reference.step()
    assert torch.equal(late.detach(), fresh.detach())  # as a first step on a refresh: the same subspace
    assert optimizer.state[late]["num_refreshes"] == 1
