"""memfit's galore-torch drop-in: swapping `from galore_torch import GaLoreAdamW` for
`from memfit.optim.galore_torch_compat import GaLoreAdamW` (or GaLoreAdamW(galore_compat=True))
reproduces a galore-torch run step for step, projected and plain groups alike."""

import warnings

import pytest
import torch

from memfit.optim import GaLoreAdamW
from memfit.optim.galore_torch_compat import GaLoreAdamW as CompatGaLoreAdamW

galore_torch = pytest.importorskip("galore_torch")


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 48),
        torch.nn.GELU(),
        torch.nn.Linear(48, 20),
        torch.nn.LayerNorm(20),
        torch.nn.Linear(20, 6),
    )
    return model.to(dtype)


def galore_groups(model, **projection):
    """galore-torch's README form: the hidden Linear weights projected, the rest plain."""
    projected = [model[2].weight, model[4].weight]
    plain = [p for p in model.parameters() if all(p is not q for q in projected)]
    return [{"params": plain}, {"params": projected, **projection}]


def train(model, optimizer, num_steps=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(num_steps):
        inputs = torch.randn(16, 12, generator=generator).to(dtype)
        targets = torch.randn(16, 6, generator=generator).to(dtype)
        loss = torch.nn.functional.mse_loss(model(inputs).float(), targets.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


PROJECTION = {"rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}


def reference_run(dtype=torch.float32, projection=PROJECTION, **settings):
    model = make_model(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's own deprecation notice
        train(model, galore_torch.GaLoreAdamW(galore_groups(model, **projection), **settings))
    return model


@pytest.mark.parametrize(
    "settings",
    [
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.05, "correct_bias": False},
        *[
            pytest.param(settings, marks=pytest.mark.slow)
            for settings in (
                {"lr": 1e-2},
                {"lr": 1e-2, "weight_decay": 0.1},
                {"lr": 1e-2, "correct_bias": True, "no_deprecation_warning": True},
            )
        ],
    ],
)
@pytest.mark.parametrize("make", [CompatGaLoreAdamW, lambda groups, **s: GaLoreAdamW(groups, galore_compat=True, **s)])
def test_swapping_the_import_reproduces_galore_torch(settings, make):
    expected = reference_run(**settings)
    model = make_model()
    memfit_settings = dict(settings)
    if make is not CompatGaLoreAdamW:
        memfit_settings.pop("no_deprecation_warning", None)
    train(model, make(galore_groups(model, **PROJECTION), **memfit_settings))
    for (name, ours), theirs in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_every_proj_type(proj_type):
    projection = {**PROJECTION, "proj_type": proj_type}
    expected = reference_run(projection=projection, lr=1e-2, weight_decay=0.01)
    model = make_model()
    train(model, CompatGaLoreAdamW(galore_groups(model, **projection), lr=1e-2, weight_decay=0.01))
    for (name, ours), theirs in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(ours, theirs), name


def test_positional_arguments_and_defaults_are_galore_torch_s():
    model = make_model()
    optimizer = CompatGaLoreAdamW(galore_groups(model, **PROJECTION), 1e-2, (0.9, 0.999), 1e-6, 0.0, False)
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["correct_bias"] is False
    assert CompatGaLoreAdamW(galore_groups(model, **PROJECTION)).defaults["eps"] == 1e-6
    assert GaLoreAdamW(galore_groups(model, **PROJECTION), galore_compat=True).defaults["eps"] == 1e-6
    assert GaLoreAdamW(galore_groups(model, **PROJECTION)).defaults["eps"] == 1e-8


def test_bf16_model_stays_close():
    expected = reference_run(torch.bfloat16, lr=1e-2, weight_decay=0.01)
    model = make_model(torch.bfloat16)
    train(model, CompatGaLoreAdamW(galore_groups(model, **PROJECTION), lr=1e-2, weight_decay=0.01))
    for (name, ours), theirs in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=2e-2, msg=name)


def test_what_galore_torch_has_and_memfit_not_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="proj_type"):
        CompatGaLoreAdamW(galore_groups(model, **{**PROJECTION, "proj_type": "full"}))
    with pytest.raises(ValueError, match="correct_bias"):
        CompatGaLoreAdamW(galore_groups(model, **PROJECTION), correct_bias="yes")


def row_major(payload):
    """Every tensor of a state dict as a fresh row-major copy, as a snapshot slot restores it."""
    if torch.is_tensor(payload):
        return payload.clone(memory_format=torch.contiguous_format).contiguous()
    if isinstance(payload, dict):
        return {key: row_major(value) for key, value in payload.items()}
    if isinstance(payload, list):
        return [row_major(value) for value in payload]
    return payload


@pytest.mark.parametrize("proj_type", ["std", "left"])
def test_a_row_major_restore_stays_galore_torchs_run(proj_type):
    """galore-torch multiplies by slices of LAPACK's column-major SVD factors; a basis restored
    row-major (as from a snapshot slot) must still give galore-torch's bits after the resume."""
    projection = {**PROJECTION, "proj_type": proj_type}
    expected = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = galore_torch.GaLoreAdamW(galore_groups(expected, **projection), lr=1e-2)
        train(expected, reference, 7)
        train(expected, reference, 8, seed=3)
    model = make_model()
    optimizer = CompatGaLoreAdamW(galore_groups(model, **projection), lr=1e-2)
    train(model, optimizer, 7)
    state = row_major(optimizer.state_dict())
    assert any(not value["basis"].t().is_contiguous() for value in state["state"].values() if "basis" in value)
    optimizer = CompatGaLoreAdamW(galore_groups(model, **projection), lr=1e-2)
    optimizer.load_state_dict(state)
    train(model, optimizer, 8, seed=3)  # crosses the refresh at step 10
    for (name, ours), theirs in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(ours, theirs), name


def test_state_round_trip_resumes_bit_identical():
    import io

    model = make_model()
    optimizer = CompatGaLoreAdamW(galore_groups(model, **PROJECTION), lr=1e-2, weight_decay=0.01)
    train(model, optimizer, 7)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model()
    resumed_model.load_state_dict(saved["model"])
    resumed = CompatGaLoreAdamW(galore_groups(resumed_model, **PROJECTION), lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(saved["optimizer"])
    train(model, optimizer, 8, seed=3)  # crosses the refresh at step 10
    train(resumed_model, resumed, 8, seed=3)
    for ours, theirs in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(ours, theirs)
