"""Hyperparameter checks shared by memfit's optimizers, with torch.optim's messages."""

import math
import numbers

import torch


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if torch.is_tensor(value):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, numbers.Real) and math.isfinite(value)


def check_adam_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's checks and messages; a value of the wrong type (a string, NaN) is a
    ValueError too, not a TypeError from a comparison."""
    if not _is_number(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr!r}")
    if not _is_number(eps) or eps < 0:
        raise ValueError(f"Invalid epsilon value: {eps!r}")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_number(beta) and 0.0 <= beta < 1.0 for beta in betas)
    ):
        raise ValueError(f"Invalid betas: {betas!r}")
    if not _is_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {tuple(choices)})")
