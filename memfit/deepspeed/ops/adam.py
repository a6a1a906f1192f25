"""deepspeed.ops.adam's optimizers on memfit's: DeepSpeedCPUAdam is CPUAdamW (the fused CPU
kernel) and FusedAdam is DeepSpeedAdam (torch's Adam/AdamW math with DeepSpeed's switches), each
with DeepSpeed's constructor arguments and defaults."""

from memfit.optim.adam import DeepSpeedAdam
from memfit.optim.cpu_adam import CPUAdamW


class DeepSpeedCPUAdam(CPUAdamW):
    def __init__(
        self,
        model_params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        adamw_mode=True,
        fp32_optimizer_states=True,
    ):
        if amsgrad:
            raise ValueError("amsgrad=True: DeepSpeedCPUAdam has no amsgrad (neither has DeepSpeed's)")
        if not fp32_optimizer_states:
            raise ValueError("fp32_optimizer_states=False: memfit's CPU kernel keeps fp32 optimizer states")
        super().__init__(
            model_params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            adamw_mode=adamw_mode,
            bias_correction=bias_correction,
        )


class FusedAdam(DeepSpeedAdam):
    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-8,
        adam_w_mode=True,
        weight_decay=0.0,
        amsgrad=False,
        set_grad_none=True,
    ):
        if amsgrad:
            raise ValueError("amsgrad=True: FusedAdam has no amsgrad (DeepSpeed's raises too)")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            adam_w_mode=adam_w_mode,
        )
