"""Hyperparameter checks shared by memfit's optimizers, with torch.optim's messages."""

import math
import numbers

import torch


def is_number(value) -> bool:
    """A finite real number (a 1-element float tensor too), not a bool."""
    if isinstance(value, bool):
        return False
    if torch.is_tensor(value):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, numbers.Real) and math.isfinite(value)


def check_adam_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's checks and messages; a value of the wrong type (a string, NaN) is a
    ValueError too, not a TypeError from a comparison."""
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not is_number(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr!r}")
    if not is_number(eps) or eps < 0:
        raise ValueError(f"Invalid epsilon value: {eps!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(is_number(beta) for beta in betas):
        raise ValueError(f"Invalid betas: {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if not is_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {tuple(choices)})")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected true or false)")
