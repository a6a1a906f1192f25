"""DeepSpeed's tests/unit/runtime/half_precision/test_dynamic_loss_scale.py (TestFused with Adam,
TestUnfused with Lamb; both run DeepSpeed's stage-0 fp16 optimizer) re-written against
memfit.deepspeed, with the same configs, gradient sequences and expected scales.

Where DeepSpeed's test reads its optimizer's loss_scale_config (cur_scale, cur_iter,
scale_window, min_loss_scale, dynamic_loss_scale), these read memfit's engine.loss_scaler
(scale, iteration, window, min_scale, dynamic): the state is the same, the names are memfit's."""

import logging
import math

import numpy as np
import pytest
import torch

from tests.compat.deepspeed_models import start


@pytest.fixture(autouse=True)
def quiet_steps():
    logging.getLogger("memfit").setLevel(logging.WARNING)


def fp16_engine(optimizer_type: str, **fp16):
    config = {
        "train_batch_size": 1,
        "steps_per_print": 1,
        "optimizer": {"type": optimizer_type, "params": {"lr": 0.00015}},
        "fp16": {"enabled": True, "loss_scale": 0, **fp16},
    }
    engine, _, _, _ = start(config, hidden_dim=1)
    return engine, engine.loss_scaler


def step_on(engine, values):
    """Each value written by hand as every parameter's gradient, then one engine step."""
    for value in values:
        for param in engine.module.parameters():
            param.grad = torch.full_like(param, float(value))
        engine.step()


OPTIMIZERS = ["Adam", "Lamb"]  # DeepSpeed's TestFused and TestUnfused


@pytest.mark.parametrize("optimizer_type", OPTIMIZERS)
def test_no_overflow(optimizer_type):
    engine, scaler = fp16_engine(optimizer_type, initial_scale_power=8, loss_scale_window=2)
    expected_scale, window = 2**8, 2
    assert scaler.dynamic and scaler.scale == expected_scale and scaler.window == window
    for i, value in enumerate(np.random.uniform(-0.1, 0.1, 10)):
        step_on(engine, [value])
        assert scaler.scale == expected_scale
        assert scaler.iteration == i + 1
        if scaler.iteration % window == 0:
            expected_scale *= 2


@pytest.mark.parametrize("optimizer_type, min_scale", [("Adam", 1), ("Lamb", 2.0)])
def test_all_overflow(optimizer_type, min_scale):
    fp16 = dict(initial_scale_power=4, loss_scale_window=2)
    if optimizer_type == "Lamb":  # DeepSpeed's TestUnfused sets min_loss_scale; TestFused keeps the default 1
        fp16["min_loss_scale"] = min_scale
    engine, scaler = fp16_engine(optimizer_type, **fp16)
    expected_scale = 2**4
    assert scaler.dynamic and scaler.scale == expected_scale
    if optimizer_type == "Lamb":
        assert scaler.min_scale == min_scale
    for i, value in enumerate([math.inf, -math.inf] + [math.nan] * 6):
        step_on(engine, [value])
        expected_scale = max(expected_scale / 2, min_scale)
        assert scaler.scale == expected_scale
        assert scaler.iteration == i + 1


@pytest.mark.parametrize("optimizer_type", OPTIMIZERS)
def test_some_overflow(optimizer_type):
    engine, scaler = fp16_engine(optimizer_type, initial_scale_power=8, loss_scale_window=2)
    expected_scale, window, expected_iteration = 2**8, 2, 0
    assert scaler.dynamic and scaler.scale == expected_scale and scaler.window == window
    for values, factor in (
        ([math.inf, math.nan], 1 / 4),
        (np.random.uniform(-0.1, 0.1, window + 1), 2),
        ([math.inf], 1 / 2),
    ):
        step_on(engine, values)
        expected_iteration += len(values)
        expected_scale *= factor
        assert scaler.scale == expected_scale
        assert scaler.iteration == expected_iteration
