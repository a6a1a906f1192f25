"""galore-torch 1.0's AdamW step (its adamw.py copies Hugging Face transformers' legacy AdamW),
one tensor at a time, in the same operations and order, so GaLoreAdamW(galore_compat=True)
reproduces galore-torch bit for bit.

Where it differs from torch.optim.AdamW:
  - eps is added to sqrt(V) uncorrected; bias correction lives in the step size,
    lr * sqrt(1 - b2^t) / (1 - b1^t), and only when correct_bias is true;
  - weight decay comes after the update, p -= lr * wd * p with the group's lr (never the GaLore
    scale), and only when wd > 0;
  - eps defaults to 1e-6.
"""

import math

import torch


def hf_adam_direction(state: dict, grad: torch.Tensor, group: dict, step: int) -> tuple[torch.Tensor, float]:
    """Updates the moments in state with grad; returns (M / (sqrt(V) + eps), step size)."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    step_size = group["lr"]
    if group["correct_bias"]:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return exp_avg / denom, step_size


def hf_apply(param: torch.Tensor, update: torch.Tensor, step_size: float, group: dict) -> None:
    """param -= step_size * update, then the decoupled weight decay."""
    param.add_(update, alpha=-step_size)
    if group["weight_decay"] > 0.0:
        param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def hf_adamw_step(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """galore-torch's step for a parameter of a group without `rank`."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    direction, step_size = hf_adam_direction(state, grad, group, state["step"])
    hf_apply(param, direction, step_size, group)
