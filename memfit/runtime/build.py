"""memfit.initialize: the ordered build of an engine from a model and a config."""

import contextlib
import logging
import os
import warnings

import torch
import torch.distributed as dist

from memfit.checkpointing.identity import fingerprint, job_id
from memfit.checkpointing.restore import restore_latest
from memfit.checkpointing.snapshot import build_snapshotter
from memfit.config import ClientComponents, ConfigError, describe_config, engine_gaps, resolve_config
from memfit.io.engine import set_default_geometry
from memfit.monitor import build_monitor
from memfit.offload.activation_swap import ActivationSwap
from memfit.offload.backward_update import BackwardUpdate
from memfit.offload.build import build_update, place_in_host_tier, streams_the_step
from memfit.offload.nvme_kernel import NvmeKernelUpdate
from memfit.offload.param_store import NvmeParamStore
from memfit.offload.streamed_step import StreamedStep
from memfit.offload.swap_space import nvme_path_problem
from memfit.optim.groups import model_layout
from memfit.runtime.activation_checkpointing import wrap_blocks
from memfit.runtime.activations import host_check_activations
from memfit.runtime.distributed import init_distributed, second_group, seed_everything
from memfit.runtime.engine import Engine, fp32_norm
from memfit.runtime.estimate import host_check_applies, host_memory_problem, stage3_managed
from memfit.runtime.logs import setup_logging
from memfit.runtime.loss_scale import build_loss_scaler
from memfit.runtime.schedulers import build_scheduler
from memfit.runtime.zero.buckets import attach_grad_buffers, build_buckets, flatten_params, staging_numel
from memfit.runtime.zero.collectives import GradientReducer
from memfit.runtime.zero.deferred_init import (
    birth_file_bytes,
    born_of,
    born_parameters,
    defers,
    fill_store,
    materialize,
    set_aside,
    stored_on_use,
)
from memfit.runtime.zero.grad_sync import GradientSync
from memfit.runtime.zero.ownership import plan_ownership
from memfit.runtime.zero.stage3 import Stage3Params

logger = logging.getLogger("memfit")


def initialize(model: torch.nn.Module, config=None, *, optimizer=None, lr_scheduler=None) -> Engine:
    """Wraps model for data-parallel training with sharded optimizer state.

    config: a JSON file path, a dict or a MemfitConfig; None reads the file named by MEMFIT_CONFIG
    (set by `memfit run --config`). optimizer: a torch.optim.Optimizer
    subclass (given config optimizer.params as keyword arguments), a factory params -> Optimizer,
    or None for the config's optimizer (AdamW by default). lr_scheduler: a factory
    optimizer -> scheduler, or None for the config's scheduler, if any.
    """
    if config is None:
        if "MEMFIT_CONFIG" not in os.environ:
            raise ValueError("config: none given and MEMFIT_CONFIG is not set (use memfit run --config FILE)")
        config = os.environ["MEMFIT_CONFIG"]
    client = ClientComponents(optimizer, lr_scheduler)
    rank, world_size, device = init_distributed(collective_timeout_s(config, client))
    with warnings.catch_warnings(record=True) as config_warnings:  # shown once the config's log level is known
        resolved = resolve_config(config, world_size, client)
    cfg = resolved.config
    setup_logging(rank, cfg.memfit.log_level)
    for caught in config_warnings:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    if gaps := engine_gaps(cfg, world_size):
        raise ConfigError(gaps, os.fspath(config) if isinstance(config, (str, os.PathLike)) else "config")
    if rank == 0:
        for line in resolved.resolved:
            logger.info("config: %s", line)
        logger.info("%s", describe_config(cfg, world_size, client=client))
    _, micro_batch_size, accumulation_steps = cfg.batch_sizes(world_size)
    seed_everything(cfg.seed + rank)
    set_default_geometry(cfg.aio.block_size, cfg.aio.queue_depth)

    compute_dtype = torch.bfloat16 if cfg.bf16.enabled else torch.float16 if cfg.fp16.enabled else None
    deferred = bool(born_parameters(model))  # built under memfit.zero_init: values in a birth file
    if deferred and not defers(cfg):
        count = materialize(model)
        deferred = False
        if rank == 0:
            logger.info(
                "model built under memfit.zero_init: its %d parameters are read back into memory (only ZeRO stage "
                '3 with offload_param.device "nvme" keeps them off memory)',
                count,
            )
    model = prepare_model(model, device, compute_dtype, world_size)
    # Traced before the blocks are wrapped (the trace checkpoints them itself), and only where state
    # is offloaded, the runs sized to the machine's memory: a trace costs about a second.
    activations = None
    zero = cfg.zero_optimization
    offloaded = zero.offload_optimizer.device != "none" or (zero.stage == 3 and zero.offload_param.device != "none")
    if offloaded and host_check_applies(cfg, device.type):
        activations = host_check_activations(model, cfg, micro_batch_size, device.type)
    if cfg.memfit.checkpoint_blocks is not None:
        swap = activation_swap(cfg, rank)
        try:
            wrap_blocks(model, cfg.memfit.checkpoint_blocks, cfg.activation_checkpointing.cpu_checkpointing, swap)
        except ValueError as error:
            raise ConfigError([str(error)], "memfit.initialize") from None
    named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named_params:
        raise ValueError("model: no trainable parameters (every parameter has requires_grad=False)")
    stage = cfg.zero_optimization.stage
    plan = plan_ownership(named_params, world_size if stage > 0 else 1)
    owned_names = set(plan.owned(rank)) if stage > 0 else set(plan.names)
    streams = streams_the_step(cfg, device)
    # under the streamed step the gradients of the tensors stage 3 moves go to the swap file
    streamed = stage3_managed(named_params, cfg.zero_optimization, world_size) if streams else set()
    buckets = build_buckets(named_params, plan, cfg.zero_optimization.reduce_bucket_size, streamed)
    if not cfg.zero_optimization.contiguous_gradients:
        warnings.warn(
            "zero_optimization.contiguous_gradients=false is ignored: memfit always keeps gradients in "
            "contiguous buckets",
            UserWarning,
            stacklevel=2,
        )
    shapes = [(name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()]
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    # Every rank decides before any of them allocates, and all fail together.
    problem = host_memory_problem(
        shapes,
        cfg,
        world_size,
        rank,
        local_world_size,
        device.type,
        client_optimizer=optimizer is not None,
        activations=activations,
        freed_before_swap=birth_file_bytes(model) if deferred else None,
    )
    if agree_on_failure(problem is not None, world_size, device):
        raise ConfigError([problem or "host memory: another rank on this node has too little"], "memfit.initialize")
    if world_size > 1 and stage in (1, 2):
        flatten_params(buckets)  # owners broadcast each bucket in place
    buffered = [b for b in buckets if stage < 2 or b.owner_rank == rank]
    if streams:  # no buffers for the streamed tensors; on one rank none at all (the small ones'
        # gradients are autograd's, dropped with the step)
        buffered = [b for b in buffered if world_size > 1 and b.names[0] not in streamed]
    attach_grad_buffers(buffered)
    # stage 3 gathers during backward too: the reduces get a group of their own, so that a bucket
    # launched at a different moment on each rank (overlap_comm) is never matched with a gather
    reduce_group = second_group(device) if stage == 3 and world_size > 1 else None
    reducer = GradientReducer(stage, rank, staging_numel(buckets, stage, rank), reduce_group)
    grad_sync = GradientSync(
        named_params, buckets, reducer, stage=stage, world_size=world_size, overlap=cfg.zero_optimization.overlap_comm
    )
    param_tier = None
    if stage == 3 and cfg.zero_optimization.offload_param.device == "cpu":
        param_tier = place_in_host_tier([p for n, p in named_params if n in owned_names], cfg, device)
    stage3 = None
    if stage == 3:
        offload_param = cfg.zero_optimization.offload_param
        open_store = None
        if offload_param.device == "nvme":

            def open_store(named):
                path, limit = offload_param.nvme_path, offload_param.max_in_cpu
                return NvmeParamStore(named, path, rank, cfg.aio, with_grads=streams, max_in_cpu=limit)

        stage3 = Stage3Params(model, named_params, plan, rank, world_size, cfg.zero_optimization, open_store)
        if deferred:  # each owner's store takes its tensors from the birth file, one at a time
            fill_store(model, stage3, rank, world_size)
    owned_params = [(n, p) for n, p in named_params if n in owned_names]
    # the low-rank factories decide what to project from the whole model; a filled store is read
    # one tensor at a time, for the call that uses it (a master copy's values)
    with model_layout(model), stored_on_use(stage3) if deferred else contextlib.nullcontext():
        masters, opt, update, tier = build_update(optimizer, cfg, owned_params, compute_dtype, device, world_size)
    if stage3 is not None:
        stage3.update_master = master_updater(masters, opt)
    in_backward = updates_in_backward(
        cfg, streams and stage3 is not None and stage3.store is not None, isinstance(update, NvmeKernelUpdate)
    )
    if streams and stage3.store is not None:
        stage3.streamed = update.streamed = StreamedStep(
            stage3,
            fp32_norm,
            needs_norm=cfg.gradient_clipping > 0,
            needs_finite=cfg.fp16.enabled,
            backward_update=BackwardUpdate(update) if in_backward else None,
        )
        if world_size > 1:
            reducer.streamed, reducer.touched = stage3.streamed, grad_sync.touched_now
    scheduler = make_scheduler(lr_scheduler, cfg, opt)
    engine = Engine(
        model=model,
        config=cfg,
        rank=rank,
        world_size=world_size,
        device=device,
        named_params=named_params,
        plan=plan,
        buckets=buckets,
        grad_sync=grad_sync,
        masters=masters,
        optimizer=opt,
        update=update,
        lr_scheduler=scheduler,
        loss_scaler=build_loss_scaler(cfg.fp16, cfg.zero_optimization.stage),
        host_tier=tier,
        micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps,
        stage3=stage3,
        param_tier=param_tier,
    )
    engine.job_id, engine.fingerprint = job_id(), fingerprint(model, cfg, optimizer, opt)
    engine.monitor = build_monitor(cfg, rank)
    engine.snapshotter = build_snapshotter(cfg.snapshot, engine)
    if engine.snapshotter is not None:
        with stage3.owned_in_memory() if deferred else contextlib.nullcontext():
            restore_latest(engine, engine.snapshotter)
    if stage3 is not None:
        stage3.release_all()  # from here on a rank holds whole only what it owns
    return engine


def master_updater(masters, optimizer):
    """param -> None: the optimizer's copy of an owned tensor takes the tensor's new values (a
    change made under deepspeed.zero.GatheredParameters with a modifier rank)."""
    separate = {id(c): m for c, m in zip(masters.compute, masters.masters)} if masters.separate else {}
    set_master = getattr(optimizer, "set_master", None)  # the fused kernel's fp32 copy of a 16-bit tensor

    def update(param) -> None:
        with torch.no_grad():
            if id(param) in separate:
                separate[id(param)].copy_(param.detach())
            elif set_master is not None and param.dtype != torch.float32:
                set_master(param, param.detach().float())

    return update


def agree_on_failure(failed: bool, world_size: int, device) -> bool:
    """True on every rank when any rank failed."""
    if world_size == 1:
        return failed
    flag = torch.tensor([1 if failed else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def activation_swap(cfg, rank: int) -> ActivationSwap | None:
    """memfit.activation_offload "nvme": the rank's swap file for the kept block inputs."""
    offload = cfg.memfit.activation_offload
    if offload.device != "nvme":
        return None
    if problem := nvme_path_problem(offload.nvme_path, offload.swap_bytes, "memfit.activation_offload.nvme_path"):
        raise ConfigError([problem], "memfit.initialize")
    return ActivationSwap(offload.nvme_path, rank, offload.swap_bytes, cfg.aio)


def collective_timeout_s(config, client: ClientComponents) -> float:
    """The config's collective_timeout_s, needed before the group exists and so before the world
    size is known: a first pass over the config without it (its warnings are given by the second,
    full pass; a problem found here is one at any world size and is raised at once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_config(config, None, client).config.collective_timeout_s


def prepare_model(model, device, compute_dtype, world_size: int):
    """Moves and casts the model, and gives every rank rank 0's weights (as DDP does). Parameters
    built under memfit.zero_init keep their values in the birth file: only the cast is recorded,
    and fill_store broadcasts their values later."""
    with set_aside(model) as born:
        model.to(device)
        if compute_dtype is not None:
            model.to(compute_dtype)
        if world_size > 1:
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(tensor.data, src=0)
    for param in born:
        born_of(param).cast(device, compute_dtype)
    return model


def make_scheduler(lr_scheduler, cfg, optimizer):
    if lr_scheduler is not None:
        return lr_scheduler(optimizer)
    if cfg.scheduler is not None:
        return build_scheduler(cfg.scheduler.type, optimizer, dict(cfg.scheduler.params))
    return None


def updates_in_backward(cfg, streams: bool, on_kernel: bool) -> bool:
    """Whether memfit.update_in_backward applies; when asked for where it cannot, a warning says why."""
    if not cfg.memfit.update_in_backward:
        return False
    reasons = [
        reason
        for reason, applies in (
            ("gradient_clipping needs every gradient's norm before any update", cfg.gradient_clipping > 0),
            ("fp16 needs every gradient checked for overflow before any update", cfg.fp16.enabled),
            (
                "it needs the streamed step (stage 3, offload_param and offload_optimizer on NVMe)",
                not streams,
            ),
            ("it needs AdamW on the fused kernel (the config's optimizer, not one passed in)", not on_kernel),
        )
        if applies
    ]
    if reasons:
        warnings.warn(f"config: memfit.update_in_backward is off: {'; '.join(reasons)}", stacklevel=3)
    return not reasons
