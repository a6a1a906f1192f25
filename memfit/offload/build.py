"""The one place a tier is chosen: from the config, the build of what holds each rank's owned
16-bit parameters (in memory, the host tier's arena, or the parameter swap file), their fp32
masters and optimizer state (where the model runs, the host tier, or the optimizer swap file), and
the update that steps them (the contract in interface.py)."""

import inspect

import torch
import torch.distributed as dist

from memfit.config import ConfigError
from memfit.offload.host_tier import HostTier, kernel_optimizer, planned_host_bytes, runs_on_kernel, stages_through_host
from memfit.offload.in_memory import KernelUpdate, OptimizerUpdate
from memfit.offload.masters import MasterWeights
from memfit.offload.nvme_kernel import NvmeKernelUpdate, StreamedAdamW, kernel_swap_bytes, optimizer_swap_bytes
from memfit.offload.nvme_optimizer import NvmeOptimizerUpdate, swapped_master_weights
from memfit.offload.swap_space import SwapSpace, open_swap
from memfit.optim.planned_state import planned_state_bytes
from memfit.optim.registry import build_optimizer

PLACEHOLDER_NAME = "<no owned tensor>"


def build_update(optimizer, cfg, owned_params, compute_dtype, device, world_size):
    """(masters, optimizer, update, host tier or None) for the tensors this rank owns: the
    optimizer on fp32 masters where the model runs, or, under offload_optimizer "cpu", on the
    host tier: Adam/AdamW as CPUAdamW on the fused kernel, any other optimizer on host masters
    with its state adopted into the tier."""
    offload = cfg.zero_optimization.offload_optimizer
    reduced = compute_dtype is not None
    # A rank that owns nothing still keeps an optimizer (param_groups, lr, the scheduler): it
    # holds one empty placeholder tensor, which never gets a gradient and is never saved.
    placeholder = [(PLACEHOLDER_NAME, torch.nn.Parameter(torch.empty(0, device=device)))]
    if offload.device == "nvme":
        return build_nvme_update(optimizer, cfg, owned_params, compute_dtype, placeholder)
    if offload.device != "cpu":
        masters = MasterWeights(owned_params, keep_fp32_copy=reduced)
        opt = make_optimizer(optimizer, cfg, list(zip(masters.names, masters.masters)) or placeholder)
        return masters, opt, OptimizerUpdate(opt, masters), None
    config_params = dict(cfg.optimizer.params) if cfg.optimizer is not None else {}
    name = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
    tensors = [p for _, p in owned_params]
    on_kernel = optimizer is None and runs_on_kernel(name)
    staged = stages_through_host(device)
    keep_masters = reduced or staged
    tier = HostTier(
        planned_host_bytes(tensors, kernel=on_kernel, reduced_precision=keep_masters), pin=offload.pin_memory
    )
    if on_kernel and not staged:  # the kernel updates the compute parameters in place
        kernel = kernel_optimizer(name, config_params, tensors or [placeholder[0][1]])
        kernel.allocate_state = tier.zeros
        return MasterWeights(owned_params, keep_fp32_copy=False), kernel, KernelUpdate(kernel, tensors, tier), tier
    masters = MasterWeights(owned_params, keep_fp32_copy=keep_masters, allocate=tier.empty if keep_masters else None)
    for master in masters.masters if keep_masters else []:
        tier.hold(master)
    if staged:
        placeholder = [(PLACEHOLDER_NAME, torch.nn.Parameter(torch.empty(0)))]
    named_masters = list(zip(masters.names, masters.masters)) or placeholder
    if on_kernel:
        opt = kernel_optimizer(name, config_params, [tensor for _, tensor in named_masters])
        opt.allocate_state = tier.zeros
    else:
        opt = make_optimizer(optimizer, cfg, named_masters)
    return masters, opt, OptimizerUpdate(opt, masters, tier), tier


def build_nvme_update(optimizer, cfg, owned_params, compute_dtype, placeholder):
    """(masters, optimizer, update, tier) under offload_optimizer "nvme" (see build_update)."""
    offload = cfg.zero_optimization.offload_optimizer
    rank = dist.get_rank() if dist.is_initialized() else 0
    config_params = dict(cfg.optimizer.params) if cfg.optimizer is not None else {}
    name = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
    tensors = [param for _, param in owned_params]

    def swap_space(capacity_bytes: int) -> SwapSpace:
        return SwapSpace(
            open_swap(
                offload.nvme_path,
                rank,
                capacity_bytes,
                block_size=cfg.aio.block_size,
                queue_depth=cfg.aio.queue_depth,
            )
        )

    if optimizer is None and runs_on_kernel(name):
        kernel = kernel_optimizer(name, config_params, tensors or [placeholder[0][1]], cls=StreamedAdamW)
        update = NvmeKernelUpdate(kernel, owned_params, swap_space(kernel_swap_bytes(tensors)), offload)
        return MasterWeights(owned_params, keep_fp32_copy=False), kernel, update, update
    masters = swapped_master_weights(owned_params, reduced=compute_dtype is not None)
    opt = make_optimizer(optimizer, cfg, list(zip(masters.names, masters.masters)) or placeholder)
    numels = [param.numel() for param in tensors]
    capacity = optimizer_swap_bytes(numels, compute_dtype is not None, planned_state_bytes(opt))
    update = NvmeOptimizerUpdate(opt, masters, swap_space(capacity), offload)
    return masters, opt, update, update


def make_optimizer(optimizer, cfg, named_params):
    config_params = dict(cfg.optimizer.params) if cfg.optimizer is not None else {}
    if optimizer is None:
        name = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
        return build_optimizer(name, named_params, config_params)
    params = [p for _, p in named_params]
    if inspect.isclass(optimizer) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, **config_params)
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer: pass the class or a factory params -> Optimizer, not an instance; memfit builds it over "
            "the parameters this rank owns"
        )
    if getattr(optimizer, "memfit_named", False):  # memfit.deepspeed: names, and the config's builder
        name = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
        return optimizer(list(named_params), lambda named: build_optimizer(name, named, config_params))
    if callable(optimizer):
        return optimizer(params)
    raise TypeError(f"optimizer: expected an Optimizer subclass or a factory, got {type(optimizer).__name__}")


def place_in_host_tier(owned: list, cfg, device) -> HostTier:
    """offload_param "cpu": the tensors this rank owns rest in a host-tier arena (which, when the
    model runs on the CPU, is where they are used)."""
    if device.type != "cpu":
        raise ConfigError(
            ['zero_optimization.offload_param.device: "cpu" is implemented for models that run on the CPU; on '
             f"{device.type} use \"none\""],
            "memfit.initialize",
        )  # fmt: skip
    tier = HostTier(
        sum(p.numel() * p.element_size() for p in owned), pin=cfg.zero_optimization.offload_param.pin_memory
    )
    for param in owned:
        placed = tier.empty(tuple(param.shape), param.dtype)
        placed.copy_(param.detach())
        param.data = placed
        tier.hold(placed)
    return tier


def streams_the_step(cfg, device) -> bool:
    """Stage 3 with offload_param and offload_optimizer both "nvme", on the CPU: gradients and the
    update stream through the swap files (offload/streamed_step.py) instead of all being in memory
    for the step, for any optimizer."""
    zero = cfg.zero_optimization
    return (
        zero.stage == 3
        and zero.offload_param.device == "nvme"
        and zero.offload_optimizer.device == "nvme"
        and device.type == "cpu"
    )
