"""A few lines that say what a resolved config will do, printed on rank 0 when training starts (as
DeepSpeed prints its config): batch arithmetic, optimizer, schedule, ZeRO, offload, precision."""

import inspect

from memfit.config.client import ClientComponents
from memfit.config.models import MemfitConfig
from memfit.config.values import show

SHOWN_OPTIMIZER_DEFAULTS = ("lr", "betas", "eps", "weight_decay", "momentum")


def describe_config(cfg: MemfitConfig, world_size: int, *, client: ClientComponents | None = None) -> str:
    train, micro, accumulation = cfg.batch_sizes(world_size)
    ranks = "rank" if world_size == 1 else "ranks"
    zero = cfg.zero_optimization
    lines = [
        f"batch: global {train} = micro batch {micro} x accumulation {accumulation} x {world_size} {ranks}",
        f"optimizer: {_optimizer(cfg, client or ClientComponents())}",
        f"schedule: {_schedule(cfg, client or ClientComponents())}",
        f"gradient clipping: {'off' if cfg.gradient_clipping == 0 else f'global L2 norm {cfg.gradient_clipping:g}'}",
        f"ZeRO stage {zero.stage}: {_zero(cfg)}; offload: {zero.offload_optimizer.device}",
        f"precision: {_precision(cfg)}",
    ]
    return "memfit config:\n" + "\n".join(f"  {line}" for line in lines)


def _keywords(values: dict) -> str:
    return " ".join(f"{key}={show(value)}" for key, value in values.items())


def _optimizer(cfg: MemfitConfig, client: ClientComponents) -> str:
    from memfit.optim.registry import OPTIMIZERS, find_optimizer

    if client.optimizer_factory is not None or client.built_optimizer is not None:
        return client.describe_optimizer()
    given = dict(cfg.optimizer.params) if cfg.optimizer is not None else {}
    if client.optimizer_class is not None:
        return f"{client.optimizer_class.__name__} {_keywords(given)}".rstrip()
    named = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
    name = find_optimizer(named)
    if name is None:  # a type the passed optimizer class replaced
        return f"{named} {_keywords(given)}".rstrip()
    shown = {
        key: given.pop(key, parameter.default)
        for key, parameter in inspect.signature(OPTIMIZERS[name]).parameters.items()
        if key in given or (key in SHOWN_OPTIMIZER_DEFAULTS and parameter.default is not parameter.empty)
    }
    return f"{name} {_keywords({**shown, **given})}"


def _schedule(cfg: MemfitConfig, client: ClientComponents) -> str:
    if client.lr_scheduler is not None:
        return "the lr_scheduler passed to memfit.initialize"
    if cfg.scheduler is None:
        return "none (constant lr)"
    params = dict(cfg.scheduler.params)
    if params.get("warmup_max_lr", 0) is None:
        params["warmup_max_lr"] = "the optimizer's lr"
    return f"{cfg.scheduler.type} {_keywords(params)}".rstrip() + ", stepped after each optimizer step"


def _zero(cfg: MemfitConfig) -> str:
    zero = cfg.zero_optimization
    owned = {
        0: "replicated optimizer",
        1: "optimizer state sharded",
        2: "optimizer state and gradients sharded",
        3: "optimizer state, gradients and parameters sharded",
    }
    overlap = ", overlapped with backward" if zero.overlap_comm else ""
    described = f"{owned[zero.stage]}, gradient buckets of {zero.reduce_bucket_size} elements{overlap}"
    if zero.stage == 3:
        described += (
            f", tensors under {zero.stage3_param_persistence_threshold} elements kept whole on every rank"
            f"; parameter offload: {zero.offload_param.device}"
        )
    return described


def _precision(cfg: MemfitConfig) -> str:
    if cfg.bf16.enabled:
        return "bf16 compute, fp32 master weights"
    fp16 = cfg.fp16
    if fp16.enabled:
        scaling = (
            f"static loss scale {fp16.loss_scale:g}"
            if fp16.loss_scale
            else f"dynamic loss scale from 2**{fp16.initial_scale_power}, window {fp16.loss_scale_window}, "
            f"hysteresis {fp16.hysteresis}, min {fp16.min_loss_scale}"
        )
        return f"fp16 compute, fp32 master weights, {scaling}"
    return "fp32"
