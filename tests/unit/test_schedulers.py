"""DeepSpeed's warmup schedules: values at chosen steps, worked out by hand from its formulas."""

import math

import pytest
import torch

from memfit.runtime.schedulers import WarmupCosineLR, WarmupDecayLR, WarmupLR


def lrs(scheduler, steps):
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def optimizer(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_lr_linear_and_log():
    linear = lrs(WarmupLR(optimizer(), 0.0, 1.0, 10, "linear"), 12)
    assert linear[:3] == [0.0, 0.1, 0.2] and linear[10:] == [1.0, 1.0, 1.0]
    log = lrs(WarmupLR(optimizer(), 0.0, 1.0, 10, "log"), 10)
    assert log[4] == pytest.approx(math.log(5) / math.log(10)) and log[10] == 1.0


def test_warmup_decay_lr_reaches_zero_at_total_steps():
    values = lrs(
        WarmupDecayLR(optimizer(), total_num_steps=20, warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="linear"), 22
    )
    assert values[10] == 1.0
    assert values[15] == pytest.approx(0.5)
    assert values[20] == 0.0 and values[22] == 0.0


def test_warmup_cosine_lr_uses_ratio_of_optimizer_lr():
    scheduler = WarmupCosineLR(
        optimizer(0.5), total_num_steps=20, warmup_num_steps=10, cos_min_ratio=0.1, warmup_type="linear"
    )
    values = lrs(scheduler, 25)
    assert values[5] == pytest.approx(0.25)
    assert values[9] == pytest.approx(0.45)
    assert values[10] == pytest.approx(0.5 * (0.1 + 0.9 * (1 + math.cos(math.pi * 0.1)) / 2))
    assert values[19] == pytest.approx(0.05) and values[25] == pytest.approx(0.05)


def test_state_dict_round_trip():
    first = WarmupLR(optimizer(), 0.0, 1.0, 10, "linear")
    lrs(first, 4)
    second = WarmupLR(optimizer(), 0.0, 1.0, 10, "linear")
    second.load_state_dict(first.state_dict())
    assert second.get_last_lr() == first.get_last_lr() == [0.4]
