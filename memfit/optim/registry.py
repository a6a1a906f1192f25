"""Optimizer names usable in a config's optimizer.type, and the check of optimizer.params."""

import difflib
import inspect
from collections.abc import Callable

import torch

from memfit.config.errors import unknown_key


def _adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True, amsgrad=False):
    """DeepSpeed's "Adam": decoupled weight decay (AdamW) unless adam_w_mode is false."""
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def _adamw(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def _sgd(params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)


OPTIMIZERS: dict[str, Callable] = {"Adam": _adam, "AdamW": _adamw, "SGD": _sgd}
DEEPSPEED_ONLY = {"OneBitAdam", "ZeroOneAdam", "Lamb", "OneBitLamb", "MuAdam", "MuAdamW", "MuSGD", "Lion", "Muon", "Adagrad"}


def register_optimizer(name: str, factory: Callable) -> None:
    """Makes factory(params, **config_params) available as optimizer.type == name."""
    OPTIMIZERS[name] = factory


def build_optimizer(name: str, params, config_params: dict) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](params, **config_params)


def optimizer_param_problems(name: str, config_params: dict) -> list[str]:
    if name not in OPTIMIZERS:
        if name in DEEPSPEED_ONLY:
            return [f"optimizer.type: {name!r} is supported by DeepSpeed, not by memfit"]
        same_letters = [known for known in OPTIMIZERS if known.lower() == name.lower()]
        close = same_letters or difflib.get_close_matches(name, list(OPTIMIZERS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return [f"optimizer.type: unknown optimizer {name!r}{hint}; known: {', '.join(sorted(OPTIMIZERS))}"]
    return signature_problems(OPTIMIZERS[name], config_params, "optimizer.params", _try_build(name))


def _try_build(name):
    def attempt(config_params):
        OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(2, 2))], **config_params)

    return attempt


def signature_problems(factory, config_params: dict, path: str, attempt, skip: int = 1) -> list[str]:
    """Unknown and missing keyword names, then whatever the factory itself rejects (ValueError,
    TypeError). skip: leading positional parameters that are not config (params; self, optimizer)."""
    parameters = [p for p in inspect.signature(factory).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD][skip:]
    accepted = [p.name for p in parameters]
    problems = [unknown_key(path, key, accepted) for key in config_params if key not in accepted]
    problems += [
        f"{path}.{p.name}: required key missing"
        for p in parameters
        if p.default is inspect.Parameter.empty and p.name not in config_params
    ]
    if problems:
        return problems
    try:
        attempt(config_params)
    except (ValueError, TypeError) as error:
        problems.append(f"{path}: {error}")
    return problems
