"""Fused optimizer kernels from memfit._C, with a torch fallback computing the same thing."""

import torch

from memfit.io.native import _C


def adam_moments(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float, eps: float
) -> torch.Tensor:
    """Updates the moments in place and returns exp_avg / (sqrt(exp_avg_sq) + eps), in one pass
    over memory when the tensors are contiguous fp32 on the CPU."""
    tensors = (exp_avg, exp_avg_sq, grad)
    if _C is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    ):
        out = torch.empty_like(exp_avg)
        _C.adam_moments_fp32(
            exp_avg.data_ptr(),
            exp_avg_sq.data_ptr(),
            grad.data_ptr(),
            out.data_ptr(),
            exp_avg.numel(),
            beta1,
            beta2,
            eps,
        )
        return out
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps)
