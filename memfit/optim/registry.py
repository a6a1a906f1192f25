"""Optimizer names usable in a config's optimizer.type (in any case, as in DeepSpeed) and their factories."""

import warnings
from collections.abc import Callable

import torch

from memfit.optim.adam import adam_optimizer
from memfit.optim.checks import check_positive_int
from memfit.optim.cpu_adam import CPUAdamW
from memfit.optim.frugal import FRUGAL
from memfit.optim.galore import GaLoreAdamW
from memfit.optim.groups import current_layout, frugal_param_groups, galore_param_groups, quiet_if_model_projects
from memfit.optim.lamb import Lamb


def _adam(
    named_params,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    bias_correction=True,
    adam_w_mode=True,
    amsgrad=False,
):
    """DeepSpeed's "Adam": decoupled weight decay (AdamW) unless adam_w_mode is false, bias
    correction unless bias_correction is false; torch's fused kernel where it has one."""
    return adam_optimizer(
        _tensors(named_params),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        adam_w_mode=adam_w_mode,
        bias_correction=bias_correction,
        amsgrad=amsgrad,
    )


def _adamw(
    named_params,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.01,
    bias_correction=True,
    adam_w_mode=True,
    amsgrad=False,
):
    """AdamW; like DeepSpeed's "AdamW" it decouples weight decay whatever adam_w_mode says."""
    if adam_w_mode is not True:
        warnings.warn(
            f"optimizer.params.adam_w_mode={adam_w_mode!r} is ignored: AdamW always decouples weight decay "
            "(as in DeepSpeed); use type Adam for L2 regularization",
            UserWarning,
            stacklevel=3,
        )
    return adam_optimizer(
        _tensors(named_params),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        adam_w_mode=True,
        bias_correction=bias_correction,
        amsgrad=amsgrad,
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


def _galore(named_params, rank: int = 128, target_modules: list[str] | None = None, proj_dtype="float32", **options):
    """GaLoreAdamW over galore_param_groups (the default rule, or target_modules, decided on the
    whole model when memfit.initialize gives its layout); every other key is a GaLoreAdamW
    keyword, so the group options become the projected group's."""
    # checked here, not only by a projected group: a config check (or a rank owning no projected
    # matrix) builds no such group, and must refuse the rank the real build would
    check_positive_int("rank", rank)
    model = current_layout() or named_params
    groups = galore_param_groups(named_params, rank, target_modules, layout=model)
    with quiet_if_model_projects(model, target_modules):
        return GaLoreAdamW(groups, proj_dtype=_dtype(proj_dtype), **options)


def _frugal(named_params, target_modules: list[str] | None = None, **options):
    """FRUGAL over frugal_param_groups (the same tensors as GaLore's split, the rest AdamW);
    every other key is a FRUGAL keyword."""
    model = current_layout() or named_params
    groups = frugal_param_groups(named_params, target_modules, layout=model)
    with quiet_if_model_projects(model, target_modules):
        return FRUGAL(groups, **options)


def _cpu_adamw(named_params, **options):
    """CPUAdamW, memfit's fused CPU kernel; every key is a CPUAdamW keyword."""
    return CPUAdamW(_tensors(named_params), **options)


def _lamb(named_params, max_grad_norm=0.0, amsgrad=False, **options):
    """DeepSpeed FusedLamb's step; every other key is a Lamb keyword."""
    if max_grad_norm != 0:
        raise ValueError("max_grad_norm: not an optimizer setting; use the config's gradient_clipping")
    if amsgrad:
        raise ValueError("amsgrad: Lamb has no AMSGrad variant (nor has DeepSpeed's FusedLamb)")
    return Lamb(_tensors(named_params), **options)


_galore.forwards_to = GaLoreAdamW
_lamb.forwards_to = Lamb
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
    "Lamb": _lamb,
}
DEEPSPEED_ONLY = {
    "OneBitAdam",
    "ZeroOneAdam",
    "OneBitLamb",
    "MuAdam",
    "MuAdamW",
    "MuSGD",
    "Lion",
    "Muon",
    "Adagrad",
}


def find_optimizer(name: str) -> str | None:
    """The registered name that `name` spells in any case ("adamw", "ADAM"), as DeepSpeed matches
    optimizer names; None if there is none."""
    return {known.lower(): known for known in OPTIMIZERS}.get(name.lower())


def register_optimizer(name: str, factory: Callable) -> None:
    """Makes factory(named_params, **config_params) available as optimizer.type == name (in any
    case); named_params is a list of (parameter name, tensor) for the tensors this rank owns."""
    existing = find_optimizer(name)
    if existing is not None and existing != name:
        raise ValueError(f"optimizer name {name!r}: {existing!r} is registered already (names ignore case)")
    OPTIMIZERS[name] = factory


def build_optimizer(name: str, named_params, config_params: dict) -> torch.optim.Optimizer:
    registered = find_optimizer(name)
    if registered is None:
        raise ValueError(f"optimizer.type: unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[registered](list(named_params), **config_params)
