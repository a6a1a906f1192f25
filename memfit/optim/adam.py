"""Adam and AdamW as a config names them, with DeepSpeed's meaning of its two switches.

DeepSpeed's FusedAdam and DeepSpeedCPUAdam take `adam_w_mode` (true: decoupled weight decay,
AdamW; false: L2 regularization, the decay added to the gradient, Adam) and `bias_correction`
(false: the moments are used as they are, with no division by 1 - beta^t, neither of the first
moment nor of the second). With bias correction the math is torch's, so memfit runs torch's
Adam/AdamW, fused where torch has a fused kernel for the device and dtypes (CPU since torch 2.4:
several times faster than foreach there), else with torch's default implementation. Without it
memfit runs DeepSpeedAdam, whose per-tensor step is below.
"""

import torch

from memfit.optim.adam_math import adam_step
from memfit.optim.checks import check_adam_hyperparameters, check_flag

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fused_supported(params) -> bool:
    """Whether torch's fused Adam kernel takes every one of these tensors (device and dtype)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without fused optimizers
        return False
    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and p.dtype in FUSED_DTYPES for p in params)


def adam_optimizer(
    params,
    *,
    lr: float,
    betas,
    eps: float,
    weight_decay: float,
    adam_w_mode: bool,
    bias_correction: bool,
    amsgrad: bool = False,
) -> torch.optim.Optimizer:
    """torch's Adam/AdamW (fused where supported) when bias_correction is on, else DeepSpeedAdam."""
    check_flag("adam_w_mode", adam_w_mode)
    check_flag("bias_correction", bias_correction)
    check_flag("amsgrad", amsgrad)
    params = list(params)
    if not bias_correction:
        if amsgrad:
            raise ValueError(
                "amsgrad: not available with bias_correction false (DeepSpeed's FusedAdam has no amsgrad at all)"
            )
        return DeepSpeedAdam(params, lr, betas, eps, weight_decay, bias_correction=False, adam_w_mode=adam_w_mode)
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    check_adam_hyperparameters(lr, betas, eps, weight_decay)
    return cls(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        fused=True if fused_supported(params) else None,
    )


class DeepSpeedAdam(torch.optim.Optimizer):
    """Adam with DeepSpeed FusedAdam's switches, one tensor at a time. With bias_correction on
    it is torch.optim.AdamW (adam_w_mode) or torch.optim.Adam bit for bit."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        adam_w_mode: bool = True,
    ):
        check_adam_hyperparameters(lr, betas, eps, weight_decay)
        check_flag("bias_correction", bias_correction)
        check_flag("adam_w_mode", adam_w_mode)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            adam_w_mode=adam_w_mode,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_adam_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            check_flag("bias_correction", group["bias_correction"])
            check_flag("adam_w_mode", group["adam_w_mode"])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    deepspeed_adam_step(param, param.grad, self.state[param], group)
        return loss


def deepspeed_adam_step(param, grad, state, group) -> None:
    """One Adam step in torch's operation order. adam_w_mode false adds the decay to the gradient
    (L2); bias_correction false leaves both moments uncorrected."""
    adam_step(param, grad, state, group, decoupled=group["adam_w_mode"], bias_correction=group["bias_correction"])
