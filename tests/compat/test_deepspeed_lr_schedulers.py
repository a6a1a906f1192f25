"""DeepSpeed's tests/unit/runtime/test_lr_schedulers.py, re-written against memfit.deepspeed:
the same configs, inputs and expected values, every assertion kept. One deliberate difference
is marked where it occurs (an unknown warmup_type is an error here, not a fall-back to "log")."""

import logging
import math

import pytest
import torch

from memfit.runtime.schedulers import SCHEDULERS, LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR
from tests.compat.deepspeed_models import adam_config, random_batches, start


@pytest.fixture(autouse=True)
def quiet_steps():
    logging.getLogger("memfit").setLevel(logging.WARNING)  # steps_per_print 1 would log every step


def is_increasing(values):
    return all(a < b for a, b in zip(values, values[1:]))


def is_decreasing(values):
    return all(a > b for a, b in zip(values, values[1:]))


def is_staircase(values, step_size):
    return all(values[i] == v for i in range(0, len(values), step_size) for v in values[i : i + step_size])


def train(engine, num_samples, record, before_step=False):
    recorded = []
    for inputs, labels in random_batches(num_samples, 2, 10):
        if before_step:
            recorded.append(record())
        engine.backward(engine(inputs, labels))
        engine.step()
        if not before_step:
            recorded.append(record())
    return recorded


@pytest.mark.parametrize(
    "schedule_type, params",
    [
        ("WarmupLR", {}),
        ("WarmupDecayLR", {"warmup_num_steps": 10, "total_num_steps": 20}),
        ("WarmupCosineLR", {"warmup_num_steps": 10, "total_num_steps": 20}),
        ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": 0.1}),
        ("LRRangeTest", {}),
    ],
)
def test_get_lr_before_train(schedule_type, params):
    engine, _, _, schedule = start(adam_config(schedule_type, params))
    for group, lr in zip(engine.optimizer.param_groups, schedule.get_lr()):
        assert group["lr"] == lr
    train(engine, 50, schedule.get_lr, before_step=True)


@pytest.mark.parametrize("warmup_num_steps", [10, 15, 19, 33])
@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_lr_warmup_schedule(warmup_num_steps, warmup_type):
    params = {"warmup_min_lr": 0.1, "warmup_max_lr": 0.2, "warmup_num_steps": warmup_num_steps}
    engine, _, _, schedule = start(adam_config("WarmupLR", {**params, "warmup_type": warmup_type}))
    lrs = train(engine, 2 * warmup_num_steps * 2, schedule.get_lr)
    assert lrs[0] == [0.1]
    assert lrs[warmup_num_steps] == [0.2]
    assert all(lr == [0.2] for lr in lrs[warmup_num_steps:])


@pytest.mark.parametrize("warmup_num_steps", [10, 15, 19, 33])
@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_lr_warmup_decay_schedule(warmup_num_steps, warmup_type):
    params = {"warmup_min_lr": 0.1, "warmup_max_lr": 0.2, "warmup_num_steps": warmup_num_steps}
    params |= {"total_num_steps": warmup_num_steps * 2, "warmup_type": warmup_type}
    engine, _, _, schedule = start(adam_config("WarmupDecayLR", params))
    lrs = train(engine, warmup_num_steps * 2 * 2, schedule.get_lr)
    assert lrs[0] == [0.1]
    assert lrs[warmup_num_steps] == [0.2]
    previous = [0.2]
    for lr in lrs[warmup_num_steps + 1 :]:
        assert lr < previous
        previous = lr


@pytest.mark.parametrize(
    "schedule_type, params",
    [
        ("WarmupLR", {}),
        ("WarmupDecayLR", {"warmup_num_steps": 5, "total_num_steps": 10}),
        ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": 0.1, "cycle_first_step_size": 5, "decay_step_size": 5}),
        ("LRRangeTest", {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 1}),
    ],
)
def test_scheduler_optimizer_parity(schedule_type, params):
    engine, _, _, schedule = start(adam_config(schedule_type, params))
    for inputs, labels in random_batches(50, 2, 10):
        engine.backward(engine(inputs, labels))
        engine.step()
        assert schedule.get_lr() == engine.get_lr()


@pytest.mark.parametrize(
    "min_lr, step_rate, step_size, staircase",
    [
        (1e-4, 1e-5, 1, True),
        (1e-5, 1e-5, 1, False),
        (1e-4, 1e-3, 10, True),
        (1e-3, 1e-3, 10, False),
        (1e-2, 1e-2, 19, True),
        (1e-2, 1e-2, 19, False),
    ],
)
def test_lr_range(min_lr, step_rate, step_size, staircase):
    params = {"lr_range_test_min_lr": min_lr, "lr_range_test_step_rate": step_rate}
    params |= {"lr_range_test_step_size": step_size, "lr_range_test_staircase": staircase}
    engine, _, _, schedule = start(adam_config("LRRangeTest", params))
    lrs = [lr for lrs in train(engine, max(50, step_size * 2), schedule.get_lr, before_step=True) for lr in lrs]
    assert lrs[0] == min_lr
    assert is_staircase(lrs, step_size) if staircase else is_increasing(lrs)


@pytest.mark.parametrize(
    "min_lr, max_lr, decay_rate, cycle_step_size, decay_step_size",
    [
        (1e-5, 1e-2, 1e-3, 10, 10),
        (1e-3, 1e-1, 0, 21, 21),
        (1e-5, 1e-2, 1e-3, 10, 10),
        (1e-3, 1e-1, 1e-1, 21, 21),
        (1e-5, 1e-1, 0, 10, 0),
    ],
)
def test_one_cycle_lr(min_lr, max_lr, decay_rate, cycle_step_size, decay_step_size):
    params = {"cycle_min_lr": min_lr, "cycle_max_lr": max_lr, "decay_lr_rate": decay_rate}
    params |= {"cycle_first_step_size": cycle_step_size, "decay_step_size": decay_step_size}
    engine, _, _, schedule = start(adam_config("OneCycle", params))
    samples = max(50, cycle_step_size * 3)
    lrs = [lr for lrs in train(engine, samples, schedule.get_lr, before_step=True) for lr in lrs]
    assert lrs[0] == min_lr
    assert lrs[cycle_step_size] == max_lr
    assert is_increasing(lrs[:cycle_step_size])
    assert is_decreasing(lrs[cycle_step_size : cycle_step_size * 2])
    if decay_rate > 0:
        assert is_decreasing(lrs[cycle_step_size * 2 :])


@pytest.mark.parametrize(
    "min_mom, max_mom, decay_rate, step_size",
    [(0.08, 0.09, 1e-3, 10), (0.08, 0.09, 0, 21), (0.08, 0.09, 1e-3, 10), (0.08, 0.09, 0, 21)],
)
def test_one_cycle_mom(min_mom, max_mom, decay_rate, step_size):
    params = {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_min_mom": min_mom, "cycle_max_mom": max_mom}
    params |= {"decay_mom_rate": decay_rate, "cycle_first_step_size": step_size, "decay_step_size": step_size}
    engine, _, _, schedule = start(adam_config("OneCycle", params))
    moms = train(engine, max(50, step_size * 3), schedule.get_mom, before_step=True)
    assert moms[0][0][0] == max_mom
    assert moms[step_size][0][0] == min_mom
    assert is_decreasing(moms[:step_size])
    assert is_increasing(moms[step_size : step_size * 2])
    if decay_rate > 0:
        assert is_increasing(moms[step_size * 2 :])


@pytest.mark.parametrize(
    "total_num_steps, warmup_num_steps, cos_min_ratio, warmup_min_ratio",
    [
        (100, 10, 0.1, 0.2),
        (200, 20, 0.1, 0.2),
        pytest.param(500, 30, 0.0, 0.2, marks=pytest.mark.slow),  # 750 to 900 engine steps each
        pytest.param(600, 300, 0.1, 0.0, marks=pytest.mark.slow),
        pytest.param(600, 550, 0.0, 0.0, marks=pytest.mark.slow),
    ],
)
def test_warmup_cosine_lr(total_num_steps, warmup_num_steps, cos_min_ratio, warmup_min_ratio):
    lr = 0.0015
    params = {"total_num_steps": total_num_steps, "warmup_min_ratio": warmup_min_ratio}
    params |= {"warmup_num_steps": warmup_num_steps, "cos_min_ratio": cos_min_ratio}
    engine, _, _, schedule = start(adam_config("WarmupCosineLR", params, lr=lr))
    lrs = [value for lrs in train(engine, max(50, total_num_steps * 3), schedule.get_lr) for value in lrs]
    assert abs(lrs[0] - lr * warmup_min_ratio) < 1e-7
    assert abs(lrs[warmup_num_steps - 1] - lr) < 1e-7
    assert abs(lrs[total_num_steps - 1] - lr * cos_min_ratio) < 1e-7
    assert is_increasing(lrs[:warmup_num_steps])
    assert is_decreasing(lrs[warmup_num_steps:total_num_steps])


def two_groups(lrs=(0.0015, 0.003), betas=(0.9, 0.999)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], betas=betas)


def test_warmup_cosine_lr_initializes_all_param_groups():
    optimizer = two_groups()
    schedule = WarmupCosineLR(optimizer=optimizer, total_num_steps=100, warmup_num_steps=10, warmup_min_ratio=0.0)
    assert schedule.get_lr_ratio() == 0.0
    assert schedule.get_lr() == [0.0, 0.0]
    assert schedule.get_last_lr() == [0.0, 0.0]
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0]
    schedule.step(1)
    ratio = math.log(2) / math.log(10)
    expected = [0.0015 * ratio, 0.003 * ratio]
    assert schedule.get_lr_ratio() == pytest.approx(ratio)
    assert schedule.get_lr() == pytest.approx(expected)
    assert schedule.get_last_lr() == pytest.approx(expected)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(expected)


def test_warmup_lr_inherits_per_group_lr_when_max_unspecified():
    optimizer = two_groups(lrs=(0.1, 0.2))
    schedule = WarmupLR(optimizer=optimizer, warmup_num_steps=10)
    assert schedule.max_lrs == [0.1, 0.2]
    schedule.step(10)
    assert schedule.get_lr() == pytest.approx([0.1, 0.2])
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.1, 0.2])


TENSOR_LR_CONTRACTS = [
    pytest.param(LRRangeTest, {}, 1e-3, 1e-3 * (1 + 2 / 2000), id="LRRangeTest"),
    pytest.param(
        OneCycle,
        dict(
            cycle_min_lr=0.01,
            cycle_max_lr=0.1,
            cycle_first_step_size=10,
            cycle_second_step_size=10,
            cycle_momentum=False,
        ),  # fmt: skip
        0.01,
        0.01 + (0.1 - 0.01) * 2 / 10,
        id="OneCycle",
    ),
    pytest.param(WarmupLR, dict(warmup_num_steps=10), 0.0, 0.1 * math.log(2) / math.log(10), id="WarmupLR"),
    pytest.param(
        WarmupDecayLR,
        dict(total_num_steps=100, warmup_num_steps=10, warmup_max_lr=0.1),
        0.0,
        0.1 * math.log(2) / math.log(10),
        id="WarmupDecayLR",
    ),
    pytest.param(
        WarmupCosineLR,
        dict(total_num_steps=100, warmup_num_steps=10),
        0.0,
        0.1 * math.log(2) / math.log(10),
        id="WarmupCosineLR",
    ),
]


@pytest.mark.parametrize("lr_shape", [(), (1,)])
@pytest.mark.parametrize("schedule_cls, kwargs, init_lr, step_lr", TENSOR_LR_CONTRACTS)
def test_lr_scheduler_preserves_tensor_lr(schedule_cls, kwargs, init_lr, step_lr, lr_shape):
    initial_lr = torch.full(lr_shape, 0.1, dtype=torch.float64)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=initial_lr)
    schedule = schedule_cls(optimizer=optimizer, **kwargs)
    for expected in (init_lr, step_lr):
        lr = optimizer.param_groups[0]["lr"]
        assert lr is initial_lr and lr.shape == lr_shape and lr.dtype == torch.float64
        assert lr.item() == pytest.approx(expected)
        schedule.step(1)


def test_all_schedulers_covered_by_tensor_lr_contract():
    assert {param.values[0] for param in TENSOR_LR_CONTRACTS} == set(SCHEDULERS.values())


def test_warmup_cosine_lr_total_num_steps_equals_warmup_num_steps():
    optimizer = torch.optim.Adam([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}])
    schedule = WarmupCosineLR(optimizer=optimizer, total_num_steps=10, warmup_num_steps=10, cos_min_ratio=0.1)
    for step in range(schedule.warmup_num_steps, schedule.warmup_num_steps + 5):
        schedule.step(step)
        assert schedule.get_lr_ratio() == pytest.approx(0.1)


@pytest.mark.parametrize("schedule_cls", [WarmupLR, WarmupDecayLR, WarmupCosineLR])
@pytest.mark.parametrize("bad_warmup_num_steps", [None, -5])
def test_warmup_schedulers_reject_invalid_warmup_num_steps(schedule_cls, bad_warmup_num_steps):
    kwargs = {"optimizer": torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.001)}
    kwargs["warmup_num_steps"] = bad_warmup_num_steps
    if schedule_cls in (WarmupDecayLR, WarmupCosineLR):
        kwargs["total_num_steps"] = 100
    with pytest.raises(ValueError):
        schedule_cls(**kwargs)


def test_warmup_cosine_lr_unknown_warmup_type_is_refused():
    # Deliberate difference, kept for correctness: DeepSpeed logs a warning and falls back to the
    # log warm-up for an unknown warmup_type; memfit refuses it, since a misspelt "linear" would
    # train the whole run on another curve with only a log line saying so.
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.001)
    with pytest.raises(ValueError, match="warmup_type must be 'log' or 'linear'"):
        WarmupCosineLR(optimizer=optimizer, total_num_steps=100, warmup_num_steps=10, warmup_type="not_a_warmup_type")


def test_warmup_cosine_lr_linear_warmup_type_produces_linear_ratios():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.001)
    schedule = WarmupCosineLR(
        optimizer=optimizer, total_num_steps=100, warmup_num_steps=10, warmup_min_ratio=0.0, warmup_type="linear"
    )
    assert schedule.warmup_type == "linear"
    for step in range(10):
        schedule.step(step)
        assert schedule.get_lr_ratio() == pytest.approx(step / 10)


def one_cycle_lrs(first_stair_count, steps=16, first_step_size=8, second_step_size=8, second_stair_count=None):
    optimizer = torch.optim.Adam([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.001}], betas=(0.9, 0.99))
    schedule = OneCycle(
        optimizer=optimizer,
        cycle_min_lr=0.001,
        cycle_max_lr=0.01,
        cycle_first_step_size=first_step_size,
        cycle_second_step_size=second_step_size,
        cycle_first_stair_count=first_stair_count,
        cycle_second_stair_count=second_stair_count,
    )
    lrs = []
    for _ in range(steps):
        schedule.step()
        lrs.append(schedule.get_lr()[0])
    return lrs


def test_one_cycle_stair_count_holds_lr_flat():
    continuous = one_cycle_lrs(0)
    assert len(set(continuous[:8])) == 8
    stairs = one_cycle_lrs(2)
    assert stairs != continuous
    assert len(set(stairs[:8])) < len(set(continuous[:8]))
    assert stairs[0] == stairs[1]
    assert one_cycle_lrs(8) == continuous


def test_one_cycle_stair_count_handles_asymmetric_cycle():
    shape = dict(steps=31, first_step_size=10, second_step_size=21)
    continuous = one_cycle_lrs(0, second_stair_count=0, **shape)
    batch_aligned = one_cycle_lrs(10, second_stair_count=21, **shape)
    assert batch_aligned == pytest.approx(continuous)
    assert batch_aligned[9] == pytest.approx(0.01)
    first_only = one_cycle_lrs(2, second_stair_count=0, **shape)
    second_only = one_cycle_lrs(0, second_stair_count=3, **shape)
    assert first_only[:10] != continuous[:10]
    assert first_only[10:] == continuous[10:]
    assert second_only[:10] == continuous[:10]
    assert second_only[10:30] != continuous[10:30]


@pytest.mark.parametrize("bad_step_size", [0, -5])
def test_lr_range_test_rejects_nonpositive_step_size(bad_step_size):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        LRRangeTest(optimizer, lr_range_test_step_size=bad_step_size)


@pytest.mark.parametrize("first, second", [(0, 0), (0, None), (-1, None), (0, 100), (100, -1)])
def test_one_cycle_rejects_nonpositive_step_sizes(first, second):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        OneCycle(optimizer, cycle_min_lr=0.001, cycle_max_lr=0.1, cycle_first_step_size=first,
                 cycle_second_step_size=second)  # fmt: skip


def test_one_cycle_allows_zero_second_step_size():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = OneCycle(optimizer, cycle_min_lr=0.001, cycle_max_lr=0.1, cycle_first_step_size=100,
                        cycle_second_step_size=0)  # fmt: skip
    assert schedule.step_ratio == 1.0
    assert schedule.get_lr() == [pytest.approx(0.001)]
    for _ in range(3):
        schedule.step()
    assert schedule.get_lr()[0] > 0.001


def test_one_cycle_accepts_per_group_lr_and_momentum_lists():
    optimizer = two_groups(lrs=(0.1, 0.2), betas=(0.9, 0.99))
    schedule = OneCycle(
        optimizer=optimizer,
        cycle_min_lr=[0.001, 0.002],
        cycle_max_lr=[0.01, 0.02],
        cycle_min_mom=[0.8, 0.85],
        cycle_max_mom=[0.9, 0.95],
        cycle_first_step_size=5,
        cycle_second_step_size=5,
    )
    assert schedule.min_lrs == pytest.approx([0.001, 0.002])
    assert schedule.max_lrs == pytest.approx([0.01, 0.02])
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.001, 0.002])
    assert [group["betas"][0] for group in optimizer.param_groups] == pytest.approx([0.8, 0.85])
    schedule.step(4)
    assert schedule.get_lr() == pytest.approx([0.01, 0.02])
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.01, 0.02])
    assert [group["betas"][0] for group in optimizer.param_groups] == pytest.approx([0.8, 0.85])
    schedule.step(9)
    assert schedule.get_lr() == pytest.approx([0.001, 0.002])
    assert [group["betas"][0] for group in optimizer.param_groups] == pytest.approx([0.9, 0.95])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cycle_min_lr": [0.001, 0.002, 0.003]},
        {"cycle_max_lr": [0.01, 0.02, 0.03]},
        {"cycle_min_mom": [0.8, 0.85, 0.9]},
        {"cycle_max_mom": [0.9, 0.95, 0.99]},
    ],
)
def test_one_cycle_rejects_wrong_length_per_group_lists(kwargs):
    defaults = {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 5}
    with pytest.raises(ValueError):
        OneCycle(optimizer=two_groups(lrs=(0.1, 0.2), betas=(0.9, 0.99)), **{**defaults, **kwargs})
