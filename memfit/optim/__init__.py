"""Optimizers usable standalone, inside memfit's engine, or anywhere a torch.optim.Optimizer goes:
GaLoreAdamW, FRUGAL, CPUAdamW (the fused CPU kernel), the layer-wise stepper, and the name
registry for configs."""

from memfit.optim.cpu_adam import CPUAdamW
from memfit.optim.frugal import FRUGAL
from memfit.optim.galore import GaLoreAdamW
from memfit.optim.groups import frugal_param_groups, galore_param_groups
from memfit.optim.layerwise import LayerwiseStepper
from memfit.optim.registry import OPTIMIZERS, build_optimizer, register_optimizer

__all__ = [
    "CPUAdamW",
    "FRUGAL",
    "OPTIMIZERS",
    "GaLoreAdamW",
    "LayerwiseStepper",
    "build_optimizer",
    "frugal_param_groups",
    "galore_param_groups",
    "register_optimizer",
]
