"""DeepSpeed 0.19's learning-rate schedules, with its parameter names, defaults and step timing:
LRRangeTest, WarmupLR, WarmupDecayLR, WarmupCosineLR and OneCycle.

Timing, as in DeepSpeed: the engine calls step() after each optimizer step, and
last_batch_iteration counts those calls from -1. Construction sets the lr of iteration -1 (the
warm-up start), so optimizer steps 1, 2, 3, ... run at iterations -1, 0, 1, ...: a linear warm-up
over N steps gives lr/N x (0, 0, 1, 2, ...). Per-group values may be lists, one per param group.
Invalid values raise ValueError naming the parameter (DeepSpeed falls back to "log" for an unknown
warmup_type; here it is an error)."""

import math
import warnings
from typing import Literal

import torch

WARMUP_TYPES = ("log", "linear")
WarmupType = Literal["log", "linear"]


def _per_group(optimizer, value, name: str) -> list:
    """value for each param group; a negative value (an lr, a ratio) would train silently wrong."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if float(item) < 0:
            raise ValueError(f"{name} must not be negative, got {item}")
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(
                f"{name}: expected {len(optimizer.param_groups)} values (one per param group), got {len(value)}"
            )
        return list(value)
    return [value] * len(optimizer.param_groups)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _set_lrs(optimizer, lrs: list[float]) -> list[float]:
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return [group["lr"] for group in optimizer.param_groups]


class _Schedule:
    """step / state_dict / get_last_lr shared by the schedules; subclasses define get_lr()."""

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = (
            self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        )
        self._last_lr = _set_lrs(self.optimizer, self.get_lr())

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        # DeepSpeed restores only the counter and relies on the optimizer's saved lr; setting the
        # lr of that iteration as well gives the same value and keeps get_last_lr() current.
        self.last_batch_iteration = state["last_batch_iteration"]
        self._last_lr = _set_lrs(self.optimizer, self.get_lr())


def _warmup_fraction(iteration: int, warmup_num_steps: int, warmup_type: str) -> float:
    if warmup_type == "log":
        return math.log(iteration + 1) / math.log(warmup_num_steps)
    return iteration / warmup_num_steps


class WarmupLR(_Schedule):
    """From warmup_min_lr to warmup_max_lr (default: the optimizer's lr) over warmup_num_steps,
    then constant."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: WarmupType = "log",
        last_batch_iteration: int = -1,
    ):
        _positive_int(warmup_num_steps, "warmup_num_steps")
        if warmup_type not in WARMUP_TYPES:
            raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
        self.optimizer = optimizer
        if warmup_max_lr is None:  # the lr's value: a tensor lr is the optimizer's, and set_lrs fills it
            warmup_max_lr = [float(group["lr"]) for group in optimizer.param_groups]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = [group["lr"] for group in optimizer.param_groups]
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(optimizer, self.get_lr())

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_fraction(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [low + (high - low) * gamma for low, high in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at total_num_steps. Without warmup_max_lr it warms up to
    0.001, DeepSpeed's default for this schedule (not the optimizer's lr, unlike WarmupLR)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] | None = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: WarmupType = "log",
        last_batch_iteration: int = -1,
    ):
        self.total_num_steps = _positive_int(total_num_steps, "total_num_steps")
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)
        if total_num_steps < self.warmup_num_steps:
            warnings.warn(
                f"WarmupDecayLR: total_num_steps {total_num_steps} < warmup_num_steps {warmup_num_steps}", stacklevel=2
            )

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_fraction(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type)
        remaining = self.total_num_steps - self.last_batch_iteration
        return max(0.0, remaining / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_Schedule):
    """Ratios of the optimizer's lr at construction: warm up from warmup_min_ratio to 1, then
    cosine down to cos_min_ratio at total_num_steps. Iteration -1 runs at lr 0."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: WarmupType = "log",
        last_batch_iteration: int = -1,
    ):
        self.total_num_steps = _positive_int(total_num_steps, "total_num_steps")
        _positive_int(warmup_num_steps, "warmup_num_steps")
        if warmup_type not in WARMUP_TYPES:
            raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
        self.optimizer = optimizer
        for name, ratio in (("warmup_min_ratio", warmup_min_ratio), ("cos_min_ratio", cos_min_ratio)):
            if not 0 <= ratio <= 1:
                raise ValueError(f"{name} must be from 0 to 1, got {ratio}")
        self.warmup_min_ratio, self.cos_min_ratio = warmup_min_ratio, cos_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        if total_num_steps < self.warmup_num_steps:
            warnings.warn(
                f"WarmupCosineLR: total_num_steps {total_num_steps} < warmup_num_steps {warmup_num_steps}", stacklevel=2
            )
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = [group["lr"] for group in optimizer.param_groups]
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(optimizer, self.get_lr())

    def get_lr_ratio(self) -> float:
        if self.last_batch_iteration < 0:
            return 0.0
        if self.last_batch_iteration < self.warmup_num_steps:
            fraction = _warmup_fraction(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + fraction * (1.0 - self.warmup_min_ratio)
        done = self.last_batch_iteration - self.warmup_num_steps + 1
        progress = min(1.0, done / max(1, self.total_num_steps - self.warmup_num_steps))
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)

    def get_lr(self) -> list[float]:
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.base_lrs]


class LRRangeTest(_Schedule):
    """The learning-rate range test: lr = min_lr x (1 + step_rate x interval), where interval is
    (iteration + 1) / step_size, floored with staircase. Iteration -1 runs at min_lr."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_range_test_min_lr: float | list[float] = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ):
        self.optimizer = optimizer
        self.min_lrs = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = _positive_int(lr_range_test_step_size, "lr_range_test_step_size")
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = [group["lr"] for group in optimizer.param_groups]
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(optimizer, list(self.min_lrs))

    def get_lr(self) -> list[float]:
        interval = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [low * (1 + self.step_rate * interval) for low in self.min_lrs]


class OneCycle(_Schedule):
    """1cycle: lr rises from cycle_min_lr to cycle_max_lr over cycle_first_step_size steps, falls
    back over cycle_second_step_size (default: the same), then decays by decay_lr_rate every
    decay_step_size steps (0: stays at cycle_min_lr). Stair counts quantise each half.

    cycle_momentum (DeepSpeed's default: on) cycles betas[0] inversely, from cycle_max_mom down to
    cycle_min_mom, for optimizers with betas; as in DeepSpeed it also sets betas[1] to 0.99, and
    optimizers without betas keep their momentum (with a warning)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cycle_min_lr: float | list[float],
        cycle_max_lr: float | list[float],
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: float = 2000,
        cycle_second_step_size: float | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: float = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float | list[float] = 0.8,
        cycle_max_mom: float | list[float] = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ):
        self.optimizer = optimizer
        first = float(cycle_first_step_size)
        second = first if cycle_second_step_size is None else float(cycle_second_step_size)
        if first <= 0:
            raise ValueError(f"cycle_first_step_size must be positive, got {cycle_first_step_size}")
        if second < 0:
            raise ValueError(f"cycle_second_step_size must be non-negative, got {cycle_second_step_size}")
        for name, count in (
            ("cycle_first_stair_count", cycle_first_stair_count),
            ("cycle_second_stair_count", cycle_second_stair_count),
        ):
            if count is not None and count < 0:
                raise ValueError(f"{name} must be non-negative, got {count}")
        for name, value in (("decay_step_size", decay_step_size), ("decay_lr_rate", decay_lr_rate)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (
            cycle_first_stair_count if cycle_second_stair_count is None else cycle_second_stair_count
        )
        self.decay_step_size = decay_step_size
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_lr_rate, 0)
        self.skip_mom_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_mom_rate, 0)
        self.cycle_momentum = cycle_momentum and self._has_betas(optimizer)
        self.decay_mom_rate = decay_mom_rate
        self.min_moms = [(mom, 0.99) for mom in _per_group(optimizer, cycle_min_mom, "cycle_min_mom")]
        self.max_moms = [(mom, 0.99) for mom in _per_group(optimizer, cycle_max_mom, "cycle_max_mom")]
        if any(beta1 >= 1 for beta1, _ in self.min_moms + self.max_moms):
            raise ValueError(f"cycle momentum must be below 1, got {cycle_min_mom} to {cycle_max_mom}")
        if last_batch_iteration == -1:
            _set_lrs(optimizer, self.min_lrs)
            if self.cycle_momentum:
                for group, betas in zip(optimizer.param_groups, self.min_moms):
                    group["betas"] = betas
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = [group["lr"] for group in optimizer.param_groups]

    @staticmethod
    def _has_betas(optimizer) -> bool:
        if "betas" in optimizer.defaults:
            return True
        warnings.warn(
            f"OneCycle: cycle_momentum is off: {type(optimizer).__name__} has no betas to cycle", stacklevel=3
        )
        return False

    def _scale(self) -> float:
        iteration = self.last_batch_iteration + 1
        x = 1.0 + iteration / self.total_size - math.floor(1 + iteration / self.total_size)
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            # quantised from the integer position, as DeepSpeed does, so a peak is not lost to rounding
            position = iteration % self.total_size
            if position <= self.first_step_size:
                stair = position * stairs / self.first_step_size
            else:
                stair = (self.total_size - position) * stairs / self.second_step_size
            scale = math.floor(stair) / stairs
        return scale

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [low + (high - low) * scale for low, high in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        decay = 1 + self.decay_lr_rate * (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [low / decay for low in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [(high[0] - (high[0] - low[0]) * scale, low[1]) for low, high in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        decay = 1 + self.decay_mom_rate * (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [(beta1 * decay, beta2) for beta1, beta2 in self.max_moms]

    def step(self, last_batch_iteration: int | None = None) -> None:
        super().step(last_batch_iteration)
        if self.cycle_momentum:
            for group, betas in zip(self.optimizer.param_groups, self.get_mom()):
                group["betas"] = betas

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.cycle_momentum:
            for group, betas in zip(self.optimizer.param_groups, self.get_mom()):
                group["betas"] = betas


SCHEDULERS = {
    "LRRangeTest": LRRangeTest,
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle,
}


def build_scheduler(name: str, optimizer, params: dict):
    return SCHEDULERS[name](optimizer, **params)
