"""Optimizers usable standalone, inside memfit's engine, or anywhere a torch.optim.Optimizer goes:
GaLoreAdamW, FRUGAL, CPUAdamW (the fused CPU kernel), DeepSpeedAdam and Lamb (DeepSpeed's
Adam switches and FusedLamb), the layer-wise stepper, and the name registry for configs.
memfit.optim.galore_torch_compat.GaLoreAdamW is galore-torch's class under its own name."""

from memfit.optim.adam import DeepSpeedAdam
from memfit.optim.cpu_adam import CPUAdamW
from memfit.optim.frugal import FRUGAL
from memfit.optim.galore import GaLoreAdamW
from memfit.optim.groups import NothingProjectedWarning, frugal_param_groups, galore_param_groups, projected_names
from memfit.optim.lamb import Lamb
from memfit.optim.layerwise import LayerwiseStepper
from memfit.optim.registry import OPTIMIZERS, build_optimizer, register_optimizer

__all__ = [
    "CPUAdamW",
    "DeepSpeedAdam",
    "FRUGAL",
    "OPTIMIZERS",
    "GaLoreAdamW",
    "Lamb",
    "LayerwiseStepper",
    "NothingProjectedWarning",
    "build_optimizer",
    "frugal_param_groups",
    "galore_param_groups",
    "projected_names",
    "register_optimizer",
]
