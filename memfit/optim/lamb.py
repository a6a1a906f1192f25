"""Lamb as DeepSpeed's FusedLamb computes it (You et al., "Large Batch Optimization for Deep
Learning", arXiv 1904.00962), one tensor at a time, for the config's "Lamb".

Per tensor p with gradient g, at step t:
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2        (moments never bias-corrected)
    u = m / (sqrt(v) + eps) + weight_decay * p             (sqrt(v + eps) with eps_inside_sqrt)
    ratio = ||p|| / ||u|| clamped to [min_coeff, max_coeff], 1 when either norm is 0
    p = p - step_size * ratio * u,   step_size = lr * sqrt(1 - b2^t) / (1 - b1^t), or lr
                                     with bias_correction false
The norms are of p before the step, and the ratio is taken of the uncorrected update: bias
correction enters through step_size only. The last step's ratios are kept, as FusedLamb keeps them
(get_lamb_coeffs()). DeepSpeed's max_grad_norm is not an optimizer setting in a config (use
gradient_clipping), and FusedLamb has no amsgrad.
"""

import math

import torch

from memfit.optim.adam_math import update_moments
from memfit.optim.checks import check_adam_hyperparameters, check_flag, is_number


class Lamb(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        eps_inside_sqrt: bool = False,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            eps_inside_sqrt=eps_inside_sqrt,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        _check_group(defaults)
        super().__init__(params, defaults)
        self.lamb_coeffs: list[torch.Tensor] = []

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.lamb_coeffs = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.lamb_coeffs.append(lamb_step(param, param.grad, self.state[param], group))
        return loss

    def get_lamb_coeffs(self) -> list[float]:
        """The trust ratios of the last step, one per tensor stepped (FusedLamb's accessor)."""
        return [float(coeff) for coeff in self.lamb_coeffs]


def _check_group(group: dict) -> None:
    check_adam_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    check_flag("bias_correction", group["bias_correction"])
    check_flag("eps_inside_sqrt", group["eps_inside_sqrt"])
    min_coeff, max_coeff = group["min_coeff"], group["max_coeff"]
    if not is_number(min_coeff) or not is_number(max_coeff) or not 0 <= min_coeff <= max_coeff:
        raise ValueError(f"Invalid min_coeff / max_coeff: {min_coeff!r} / {max_coeff!r} (need 0 <= min <= max)")


def lamb_step(param, grad, state, group) -> torch.Tensor:
    """One FusedLamb step on one tensor; returns the trust ratio used (a 0-d tensor, no sync)."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
    update_moments(exp_avg, exp_avg_sq, grad, group["betas"])
    if group["eps_inside_sqrt"]:
        denom = (exp_avg_sq + group["eps"]).sqrt_()
    else:
        denom = exp_avg_sq.sqrt().add_(group["eps"])
    update = (exp_avg / denom).add_(param, alpha=group["weight_decay"])
    weight_norm, update_norm = param.norm(), update.norm()
    ratio = (weight_norm / update_norm).clamp(group["min_coeff"], group["max_coeff"])
    ratio = torch.where((weight_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))
    step_size = group["lr"]
    if group["bias_correction"]:
        step_size *= math.sqrt(1 - beta2**step) / (1 - beta1**step)
    param.sub_(update.mul_(ratio * step_size))
    return ratio
