"""Loss scaling for fp16 training, with DeepSpeed's semantics (fp16.loss_scale,
initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis, min_loss_scale).

The loss is multiplied by the scale before backward so small fp16 gradients do not underflow;
the step divides it out again. With dynamic scaling (loss_scale 0) a step whose gradients hold
an inf or nan on any rank is skipped, and the scale is halved, but only once `hysteresis`
overflows have been seen (the hysteresis is refilled when the scale grows, or after every good
step with consecutive_hysteresis). After `loss_scale_window` steps without overflow since the
last one, the scale doubles. The scale never goes below min_loss_scale; an overflow at the
minimum stops training, as in DeepSpeed's ZeRO optimizers.

At ZeRO stage 0 DeepSpeed runs its FP16_Optimizer, whose scaler has no hysteresis (every overflow
halves the scale) and stays at min_loss_scale instead of stopping; memfit follows it there, so a
config gives the same scale trajectory on DeepSpeed and memfit at every stage.
"""


class StaticLossScaler:
    dynamic = False

    def __init__(self, scale: float):
        self.scale = float(scale)

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    dynamic = True

    def __init__(
        self,
        initial_scale: float,
        window: int,
        min_scale: float,
        hysteresis: int,
        consecutive: bool,
        stop_at_min: bool = True,
    ):
        self.stop_at_min = stop_at_min
        self.scale = float(initial_scale)
        self.window = window
        self.min_scale = float(min_scale)
        self.hysteresis = hysteresis
        self.consecutive = consecutive
        self.hysteresis_left = hysteresis
        self.iteration = 0
        self.last_overflow_iteration = -1

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.hysteresis == 1 or self.hysteresis_left == 1:
                if self.scale == self.min_scale and self.stop_at_min:
                    raise RuntimeError(
                        f"fp16: the loss scale is already at min_loss_scale ({self.min_scale:g}) and the gradients "
                        "still overflow; training cannot continue"
                    )
                self.scale = max(self.scale / 2.0, self.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if self.consecutive:
                self.hysteresis_left = self.hysteresis
            stable_steps = self.iteration - self.last_overflow_iteration - 1
            if stable_steps > 0 and stable_steps % self.window == 0:
                if not self.consecutive:
                    self.hysteresis_left = self.hysteresis
                self.scale *= 2.0
        self.iteration += 1

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "hysteresis_left": self.hysteresis_left,
            "iteration": self.iteration,
            "last_overflow_iteration": self.last_overflow_iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iteration = int(state["last_overflow_iteration"])


def build_loss_scaler(fp16_config, stage: int):
    """The scaler for the config's fp16 section at ZeRO `stage`; None when fp16 is off."""
    if not fp16_config.enabled:
        return None
    if fp16_config.loss_scale > 0:
        return StaticLossScaler(fp16_config.loss_scale)
    return DynamicLossScaler(
        initial_scale=2.0**fp16_config.initial_scale_power,
        window=fp16_config.loss_scale_window,
        min_scale=fp16_config.min_loss_scale,
        hysteresis=fp16_config.hysteresis if stage > 0 else 1,
        consecutive=fp16_config.consecutive_hysteresis,
        stop_at_min=stage > 0,
    )
