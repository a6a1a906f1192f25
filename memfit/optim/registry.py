"""Optimizer names usable in a config's optimizer.type, and the check of optimizer.params."""

import difflib
import inspect
from collections.abc import Callable

import torch

from memfit.config.errors import unknown_key


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


def _galore(
    named_params,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    rank=128,
    update_proj_gap=200,
    scale=0.25,
    proj_type="std",
    projector=None,
    moments_on_refresh="keep",
    target_modules=("attn", "mlp"),
    galore_compat=False,
    proj_dtype="float32",
    seed=0,
):
    """GaLoreAdamW over galore_param_groups: 2-D weights of target modules projected."""
    from memfit.optim.galore import GaLoreAdamW
    from memfit.optim.groups import galore_param_groups

    groups = galore_param_groups(
        named_params,
        rank,
        tuple(target_modules),
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        moments_on_refresh=moments_on_refresh,
    )
    return GaLoreAdamW(
        groups,
        projector=projector,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        galore_compat=galore_compat,
        proj_dtype=_dtype(proj_dtype),
        seed=seed,
    )


def _frugal(
    named_params,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    density=0.25,
    update_gap=200,
    proj_type="blockwise",
    state_free="signsgd",
    state_free_lr_scale=1.0,
    proj_scale=1.0,
    reset_state_on_refresh=True,
    target_modules=("attn", "mlp"),
    seed=0,
):
    """FRUGAL over frugal_param_groups: 2-D weights of target modules split, the rest AdamW."""
    from memfit.optim.frugal import FRUGAL
    from memfit.optim.groups import frugal_param_groups

    return FRUGAL(
        frugal_param_groups(named_params, tuple(target_modules)),
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        density=density,
        update_gap=update_gap,
        proj_type=proj_type,
        state_free=state_free,
        state_free_lr_scale=state_free_lr_scale,
        proj_scale=proj_scale,
        reset_state_on_refresh=reset_state_on_refresh,
        seed=seed,
    )


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
