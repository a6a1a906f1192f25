"""Optimizer names usable in a config's optimizer.type, and the check of optimizer.params."""

import difflib
import inspect
from collections.abc import Callable

import torch

from memfit.config.errors import unknown_key
from memfit.optim.cpu_adam import CPUAdamW
from memfit.optim.frugal import FRUGAL
from memfit.optim.galore import GaLoreAdamW
from memfit.optim.groups import frugal_param_groups, galore_param_groups


def _adam(named_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True, amsgrad=False):
    """DeepSpeed's "Adam": decoupled weight decay (AdamW) unless adam_w_mode is false."""
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    return cls(_tensors(named_params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def _adamw(named_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False):
    return torch.optim.AdamW(
        _tensors(named_params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
    )


def _sgd(named_params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    return torch.optim.SGD(
        _tensors(named_params),
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )


def _galore(named_params, rank=128, target_modules=("attn", "mlp"), proj_dtype="float32", **options):
    """GaLoreAdamW over galore_param_groups (2-D weights of target modules get `rank`); every
    other key is a GaLoreAdamW keyword, so the group options become the projected group's."""
    groups = galore_param_groups(named_params, rank, tuple(target_modules))
    return GaLoreAdamW(groups, proj_dtype=_dtype(proj_dtype), **options)


def _frugal(named_params, target_modules=("attn", "mlp"), **options):
    """FRUGAL over frugal_param_groups (2-D weights of target modules split, the rest AdamW);
    every other key is a FRUGAL keyword."""
    return FRUGAL(frugal_param_groups(named_params, tuple(target_modules)), **options)


def _cpu_adamw(named_params, **options):
    """CPUAdamW, memfit's fused CPU kernel; every key is a CPUAdamW keyword."""
    return CPUAdamW(_tensors(named_params), **options)


_galore.forwards_to = GaLoreAdamW
_frugal.forwards_to = FRUGAL
_cpu_adamw.forwards_to = CPUAdamW


def _tensors(named_params):
    return [p for _, p in named_params]


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"proj_dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


OPTIMIZERS: dict[str, Callable] = {
    "Adam": _adam,
    "AdamW": _adamw,
    "SGD": _sgd,
    "GaLoreAdamW": _galore,
    "FRUGAL": _frugal,
    "CPUAdamW": _cpu_adamw,
}
DEEPSPEED_ONLY = {
    "OneBitAdam",
    "ZeroOneAdam",
    "Lamb",
    "OneBitLamb",
    "MuAdam",
    "MuAdamW",
    "MuSGD",
    "Lion",
    "Muon",
    "Adagrad",
}


def register_optimizer(name: str, factory: Callable) -> None:
    """Makes factory(named_params, **config_params) available as optimizer.type == name;
    named_params is a list of (parameter name, tensor) for the tensors this rank owns."""
    OPTIMIZERS[name] = factory


def build_optimizer(name: str, named_params, config_params: dict) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](list(named_params), **config_params)


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
        OPTIMIZERS[name]([("attn.weight", torch.nn.Parameter(torch.zeros(4, 4)))], **config_params)

    return attempt


def signature_problems(factory, config_params: dict, path: str, attempt, skip: int = 1) -> list[str]:
    """Unknown and missing keyword names, then whatever the factory itself rejects (ValueError,
    TypeError). skip: leading positional parameters that are not config (params; self, optimizer).
    A factory whose `forwards_to` names a class also accepts that class's keywords after params."""
    parameters = [p for p in inspect.signature(factory).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD][skip:]
    if hasattr(factory, "forwards_to"):
        own = {p.name for p in parameters}
        forwarded = list(inspect.signature(factory.forwards_to).parameters.values())[1:]  # after params
        keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        parameters += [p for p in forwarded if p.kind in keywords and p.name not in own]
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
