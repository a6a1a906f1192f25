"""The Adam update, written once for every optimizer that runs it (DeepSpeedAdam, GaLoreAdamW and
FRUGAL on their plain and projected tensors, Lamb, and CPUAdamW's torch fallback).

Per tensor, with gradient g and step t:
    m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2                 update_moments
    p = p - lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)           adam_step (torch's order)
bias1 = 1 - b1^t and bias2 = 1 - b2^t, or 1 without bias correction. Moments may be kept in
another dtype than the gradient (fp32 moments beside bf16 parameters, a state saved in fp32 and
loaded beside bf16 ones): the gradient is widened or narrowed to the moments' dtype, so the state
keeps its precision and the step does not fail.
"""

import math

import torch


def bias_corrections(betas, step: int, enabled: bool) -> tuple[float, float]:
    """(1 - b1^t, 1 - b2^t), or (1, 1) when bias correction is off."""
    beta1, beta2 = betas
    return (1 - beta1**step, 1 - beta2**step) if enabled else (1.0, 1.0)


def update_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, betas) -> None:
    """The two moments, in place, in torch.optim.AdamW's operations and order."""
    beta1, beta2 = betas
    blend_moments(exp_avg, exp_avg_sq, grad, 1 - beta1, beta2, 1 - beta2)


def blend_moments(exp_avg, exp_avg_sq, grad, one_minus_beta1: float, beta2: float, one_minus_beta2: float) -> None:
    """update_moments with its weights given as they are (the fused kernel's constants, which
    hold 1 - beta rounded once, so that its torch fallback matches it bit for bit)."""
    if grad.dtype != exp_avg.dtype:
        grad = grad.to(exp_avg.dtype)
    exp_avg.lerp_(grad, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=one_minus_beta2)


def adam_step(param, grad, state: dict, group: dict, *, decoupled: bool = True, bias_correction: bool = True) -> None:
    """One Adam step on one tensor, torch's single-tensor AdamW (decoupled) or Adam (L2: the decay
    added to the gradient) operation for operation; state gets step, exp_avg and exp_avg_sq."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    state["step"] += 1
    lr, weight_decay = group["lr"], group["weight_decay"]
    if decoupled:
        param.mul_(1 - lr * weight_decay)
    elif weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    update_moments(state["exp_avg"], state["exp_avg_sq"], grad, group["betas"])
    bias1, bias2 = bias_corrections(group["betas"], state["step"], bias_correction)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
    param.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
