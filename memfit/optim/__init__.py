"""Optimizers usable standalone, inside memfit's engine, or anywhere a torch.optim.Optimizer goes:
GaLoreAdamW, FRUGAL, the layer-wise stepper, and the name registry for configs."""

from memfit.optim.frugal import FRUGAL
from memfit.optim.galore import GaLoreAdamW
from memfit.optim.groups import frugal_param_groups, galore_param_groups
from memfit.optim.layerwise import LayerwiseStepper
from memfit.optim.registry import OPTIMIZERS, build_optimizer, register_optimizer

__all__ = [
    "FRUGAL",
    "OPTIMIZERS",
    "GaLoreAdamW",
    "LayerwiseStepper",
    "build_optimizer",
    "frugal_param_groups",
    "galore_param_groups",
    "register_optimizer",
]
