"""Optimizers usable standalone or inside memfit's engine, and the name registry for configs."""

from memfit.optim.registry import OPTIMIZERS, build_optimizer, register_optimizer

__all__ = ["OPTIMIZERS", "build_optimizer", "register_optimizer"]
