"""DeepSpeed 0.19's schedules: the lr each optimizer step runs at, worked out by hand from its
formulas and step timing (construction sets iteration -1; the engine steps the schedule after each
optimizer step), and, when deepspeed is installed (the [compare] extra), equal to DeepSpeed's own
classes step for step."""

import math

import pytest
import torch

from memfit.runtime.schedulers import OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR


def optimizer(lr=0.1, kind=torch.optim.AdamW, num_groups=1):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(num_groups)]
    return kind(groups, lr=lr)


def lrs_used(scheduler, num_steps):
    """The lr of each optimizer step, then the schedule's step, as the engine runs them."""
    used = []
    for _ in range(num_steps):
        used.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return used


def test_linear_warmup_starts_at_zero_for_two_steps():
    used = lrs_used(WarmupLR(optimizer(), 0.0, 1.0, 10, "linear"), 14)
    assert used[:4] == [0.0, 0.0, 0.1, 0.2]
    assert used[10] == pytest.approx(0.9) and used[11:] == [1.0, 1.0, 1.0]


def test_log_warmup():
    used = lrs_used(WarmupLR(optimizer(), 0.0, 1.0, 10, "log"), 12)
    assert used[:2] == [0.0, 0.0]
    assert used[2] == pytest.approx(math.log(2) / math.log(10))
    assert used[5] == pytest.approx(math.log(5) / math.log(10))
    assert used[11] == 1.0


def test_warmup_without_max_lr_reaches_the_optimizers_lr():
    used = lrs_used(WarmupLR(optimizer(lr=3e-5), warmup_num_steps=4, warmup_type="linear"), 8)
    assert used == pytest.approx([0.0, 0.0, 0.75e-5, 1.5e-5, 2.25e-5, 3e-5, 3e-5, 3e-5])


def test_warmup_decay_defaults_to_deepspeeds_0_001_and_decays_to_zero():
    scheduler = WarmupDecayLR(optimizer(lr=3e-5), total_num_steps=20, warmup_num_steps=10, warmup_type="linear")
    used = lrs_used(scheduler, 24)
    assert used[11] == pytest.approx(0.001)  # iteration 10
    assert used[16] == pytest.approx(0.0005)  # iteration 15: (20 - 15) / 10
    assert used[21:] == [0.0, 0.0, 0.0]
    with_optimizer_lr = WarmupDecayLR(optimizer(lr=3e-5), 20, warmup_max_lr=None, warmup_num_steps=10)
    assert max(lrs_used(with_optimizer_lr, 20)) == pytest.approx(3e-5)


def test_warmup_cosine_runs_its_first_step_at_zero():
    scheduler = WarmupCosineLR(
        optimizer(0.5),
        total_num_steps=20,
        warmup_min_ratio=0.1,
        warmup_num_steps=10,
        cos_min_ratio=0.1,
        warmup_type="linear",
    )
    used = lrs_used(scheduler, 26)
    assert used[0] == 0.0  # iteration -1
    assert used[1] == pytest.approx(0.05)  # iteration 0: warmup_min_ratio
    assert used[6] == pytest.approx(0.5 * (0.1 + 0.5 * 0.9))
    assert used[11] == pytest.approx(0.5 * (0.1 + 0.9 * (1 + math.cos(math.pi * 0.1)) / 2))
    assert used[20] == pytest.approx(0.05) and used[25] == pytest.approx(0.05)


def test_one_cycle_lr_and_momentum():
    opt = optimizer(kind=torch.optim.AdamW)
    scheduler = OneCycle(
        opt, cycle_min_lr=0.1, cycle_max_lr=1.1, cycle_first_step_size=4, cycle_min_mom=0.8, cycle_max_mom=0.9
    )
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    used = lrs_used(scheduler, 10)
    # iteration i uses (i + 1) of the 8-step cycle: up 4 steps, down 4, then cycle_min_lr
    assert used == pytest.approx([0.1, 0.35, 0.6, 0.85, 1.1, 0.85, 0.6, 0.35, 0.1, 0.1])
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.99))


def test_one_cycle_without_betas_keeps_momentum_with_a_warning():
    opt = optimizer(kind=torch.optim.SGD)
    with pytest.warns(UserWarning, match="cycle_momentum is off: SGD has no betas"):
        scheduler = OneCycle(opt, 0.1, 1.0, cycle_first_step_size=2)
    lrs_used(scheduler, 3)
    assert "betas" not in opt.param_groups[0]


def test_one_cycle_decay_and_stairs():
    scheduler = OneCycle(
        optimizer(), 0.2, 1.0, cycle_first_step_size=4, cycle_first_stair_count=2, decay_lr_rate=1.0, decay_step_size=2
    )
    used = lrs_used(scheduler, 12)
    assert used[:9] == pytest.approx([0.2, 0.2, 0.6, 0.6, 1.0, 0.6, 0.6, 0.2, 0.2])
    assert used[9] == pytest.approx(0.2 / 1.5) and used[11] == pytest.approx(0.2 / 2.5)


def test_per_group_values():
    scheduler = WarmupLR(optimizer(num_groups=2), [0.0, 0.5], [1.0, 2.0], 4, "linear")
    lrs_used(scheduler, 6)
    assert scheduler.get_last_lr() == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"^warmup_min_lr: expected 2 values \(one per param group\), got 3$"):
        WarmupLR(optimizer(num_groups=2), [0.0, 0.1, 0.2])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"warmup_num_steps": 0}, "warmup_num_steps must be a positive integer, got 0"),
        ({"warmup_num_steps": True}, "warmup_num_steps must be a positive integer, got True"),
        ({"warmup_type": "cubic"}, "warmup_type must be 'log' or 'linear', got 'cubic'"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        WarmupLR(optimizer(), **kwargs)


@pytest.mark.parametrize("schedule", ["WarmupLR", "WarmupCosineLR", "OneCycle"])
def test_state_dict_round_trip(schedule):
    def build():
        opt = optimizer()
        if schedule == "WarmupLR":
            return WarmupLR(opt, 0.0, 1.0, 10, "linear")
        if schedule == "WarmupCosineLR":
            return WarmupCosineLR(opt, 20, warmup_num_steps=5)
        return OneCycle(opt, 0.1, 1.0, cycle_first_step_size=3)

    first, second = build(), build()
    lrs_used(first, 4)
    second.load_state_dict(first.state_dict())
    assert second.get_last_lr() == first.get_last_lr()
    assert second.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
    assert lrs_used(second, 5) == lrs_used(first, 5)


# Each schedule and parameter set, run side by side with DeepSpeed's class of the same name.
DEEPSPEED_CASES = [
    ("WarmupLR", {"warmup_min_lr": 0.0, "warmup_max_lr": 1.0, "warmup_num_steps": 10, "warmup_type": "linear"}),
    ("WarmupLR", {"warmup_min_lr": 0.01, "warmup_num_steps": 7, "warmup_type": "log"}),
    ("WarmupLR", {"warmup_num_steps": 1}),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_num_steps": 10, "warmup_type": "linear"}),
    ("WarmupDecayLR", {"total_num_steps": 25, "warmup_min_lr": 0.001, "warmup_max_lr": 0.2, "warmup_num_steps": 5}),
    ("WarmupDecayLR", {"total_num_steps": 3, "warmup_num_steps": 10}),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 10, "cos_min_ratio": 0.1, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_min_ratio": 0.2, "warmup_num_steps": 8}),
    ("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 5}),
    (
        "OneCycle",
        {
            "cycle_min_lr": 0.01,
            "cycle_max_lr": 0.1,
            "cycle_first_step_size": 4,
            "cycle_second_step_size": 6,
            "cycle_first_stair_count": 2,
            "decay_lr_rate": 0.5,
            "decay_step_size": 3,
            "decay_mom_rate": 0.1,
        },
    ),
    ("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 3, "cycle_momentum": False}),
]


@pytest.mark.parametrize("name,params", DEEPSPEED_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DEEPSPEED_CASES)])
def test_equal_to_deepspeed(name, params):
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    from memfit.runtime.schedulers import SCHEDULERS

    ours_opt, theirs_opt = optimizer(lr=0.05), optimizer(lr=0.05)
    ours, theirs = SCHEDULERS[name](ours_opt, **params), getattr(lr_schedules, name)(theirs_opt, **params)
    for _ in range(40):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs_opt.param_groups[0]["lr"], abs=1e-15)
        assert ours_opt.param_groups[0]["betas"] == pytest.approx(theirs_opt.param_groups[0]["betas"])
        ours.step()
        theirs.step()
