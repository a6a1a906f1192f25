"""Memory estimate per rank, per category and tier, for a model (its tensor shapes) and a config,
without allocating anything: the same ownership plan and buckets the engine builds, and the
optimizer built over meta tensors, whose planned_state_bytes() (GaLore, FRUGAL) or family
(Adam: two fp32 moments; SGD with momentum: one) gives its state.

Categories: params (compute copies, every rank; at stage 3 the owned tensors and those under the
persistence threshold, with the gathered working set as a note), grads (stage 0/1: every
gradient; stage 2/3: the owned ones plus the staging buffer a non-owned bucket is sent from),
master_weights (fp32 copies of owned 16-bit tensors), optimizer_state. Tiers: "device" where the
model runs, "host" the host tier under offload_optimizer "cpu" (under "nvme": the ring buffers of
the fused step, or the sub-groups resident at once for other optimizers), "nvme" the rank's swap
file(s). DeepSpeed's own estimate for ZeRO-2 (estimate_zero2_model_states_mem_needs) is given
beside it where it has one.
"""

import os
from dataclasses import dataclass, field

import psutil
import torch

from memfit.io.extents import align_up
from memfit.offload.build import streams_the_step
from memfit.offload.host_tier import runs_on_kernel, stages_through_host
from memfit.offload.param_store import kept_in_memory, store_slot_bytes
from memfit.offload.swap_space import swap_file_bytes
from memfit.runtime.zero.buckets import build_buckets, staging_numel
from memfit.runtime.zero.ownership import plan_ownership
from memfit.units import format_bytes

CATEGORIES = ("params", "grads", "master_weights", "optimizer_state")


@dataclass
class RankEstimate:
    rank: int
    grad_staging: int = 0  # included in bytes["grads"]
    owned_numel: int = 0  # elements of the trainable tensors the rank owns (what its snapshot keeps)
    gathered_peak: int = 0  # stage 3: bytes of other ranks' tensors held at once, at most
    param_swap: int = 0  # offload_param "nvme": the parameter swap file (included in tiers["nvme"])
    bytes: dict[str, int] = field(default_factory=dict)  # per category
    tiers: dict[str, int] = field(default_factory=dict)  # "device", "host"
    notes: list[str] = field(default_factory=list)


def shapes_of(model: torch.nn.Module) -> list[tuple[str, tuple, bool]]:
    """(name, shape, trainable) of every parameter; a model built on the meta device costs nothing."""
    return [(name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()]


def estimate(
    shapes, cfg, world_size: int, client_optimizer: bool = False, device_type: str = "cpu"
) -> list[RankEstimate]:
    """Per-rank estimate for shapes [(name, shape, trainable)] under a resolved MemfitConfig;
    client_optimizer: initialize was given an optimizer of its own, whose state is unknown here;
    device_type: where the model runs (off the CPU, the host tier keeps fp32 masters even for
    fp32 compute)."""
    zero = cfg.zero_optimization
    reduced = cfg.bf16.enabled or cfg.fp16.enabled
    compute_bytes = 2 if reduced else 4
    trainable = [(name, torch.empty(shape, device="meta")) for name, shape, grad in shapes if grad]
    frozen_numel = sum(_numel(shape) for _, shape, grad in shapes if not grad)
    plan = plan_ownership(trainable, world_size if zero.stage > 0 else 1)
    managed = stage3_managed(trainable, zero, world_size)
    managed_tensors = [t for name, t in trainable if name in managed]
    # the streamed step (offload/streamed_step.py): gradients of the managed tensors rest in the
    # parameter swap file, which has a slot for each; only the others have buffers (several ranks)
    streams = streams_the_step(cfg, torch.device(device_type))
    buckets = build_buckets(trainable, plan, zero.reduce_bucket_size, managed if streams else set())
    all_numel = sum(t.numel() for _, t in trainable)
    offload = zero.offload_optimizer
    offloaded = offload.device in ("cpu", "nvme")
    keep_masters = reduced or (offloaded and stages_through_host(torch.device(device_type)))
    estimates = []
    for rank in range(world_size):
        owned_names = set(plan.owned(rank)) if zero.stage > 0 else set(plan.names)
        owned = [(name, t) for name, t in trainable if name in owned_names]
        owned_numel = sum(t.numel() for _, t in owned)
        staging = staging_numel(buckets, zero.stage, rank)
        grads = owned_numel + staging if zero.stage >= 2 else all_numel
        if streams and world_size == 1:  # between steps none is held: the small ones' go with the step
            grads = 0  # (the kept tensors' buffers are added below, once kept is known)
        elif streams:  # the small tensors' buckets have buffers; the staging buffer
            grads = sum(t.numel() for name, t in owned if name not in managed) + staging
        result = RankEstimate(rank, grad_staging=compute_bytes * staging, owned_numel=owned_numel)
        state, note = _optimizer_state_bytes(cfg, owned, trainable, offloaded, client_optimizer)
        if note:
            result.notes.append(note)
        masters = 4 * owned_numel if keep_masters else 0
        # stage 3: between steps a rank holds its own tensors and the small ones every rank keeps
        stored = zero.offload_param.device == "nvme"  # the owned ones rest in the parameter swap file
        owned_stored = [(name, t) for name, t in owned if name in managed] if stored else []
        kept = kept_in_memory(owned_stored, zero.offload_param.max_in_cpu)  # or in memory, up to max_in_cpu
        not_held = [
            t for name, t in trainable if name in managed and name not in kept and (stored or name not in owned_names)
        ]
        held_numel = all_numel - sum(t.numel() for t in not_held)
        kept_numel = sum(t.numel() for name, t in owned_stored if name in kept)
        if streams:  # a kept tensor's gradient has a buffer in memory, not a slot in the swap file
            grads += kept_numel
        if not_held:  # the bound over all managed tensors: one figure for every rank
            result.gathered_peak = compute_bytes * gathered_peak_numel(managed_tensors, zero)
            result.notes.append(
                "stage 3: the figures are between steps; while tensors are gathered a rank holds up to "
                f"{format_bytes(result.gathered_peak)} more (the prefetch window and the running module's tensors)"
            )
        result.bytes = {
            "params": compute_bytes * (held_numel + frozen_numel),
            "grads": compute_bytes * grads,
            "master_weights": masters,
            "optimizer_state": state,
        }
        device = result.bytes["params"] + result.bytes["grads"]
        if offload.device == "nvme":
            result.tiers = {
                "device": device,
                **_nvme_tiers(owned, offload, keep_masters, state, runs_on_kernel(_optimizer_name(cfg))),
            }
        elif offloaded:
            result.tiers = {"device": device, "host": masters + state}
        else:
            result.tiers = {"device": device + masters + state, "host": 0}
        if stored:
            swap = store_slot_bytes(owned_stored, kept, streams, compute_bytes)
            result.param_swap = swap_file_bytes(swap) if owned_stored else 0
            result.tiers["nvme"] = result.tiers.get("nvme", 0) + result.param_swap
        on_host = owned_numel if zero.stage == 3 and zero.offload_param.device == "cpu" else 0  # the host tier's
        on_host += kept_numel * (2 if streams else 1)  # kept in memory (max_in_cpu), with their gradients
        if on_host:
            result.tiers["device"] -= compute_bytes * on_host
            result.tiers["host"] = result.tiers.get("host", 0) + compute_bytes * on_host
        estimates.append(result)
    return estimates


def stage3_managed(trainable, zero, world_size: int) -> set[str]:
    """The tensors stage 3 gathers where they are used (the others stay whole on every rank)."""
    if zero.stage != 3 or (world_size == 1 and zero.offload_param.device != "nvme"):
        return set()
    return {name for name, t in trainable if t.numel() >= zero.stage3_param_persistence_threshold}


def gathered_peak_numel(managed, zero) -> int:
    """Elements of gathered tensors held at once at most: what is in flight (the prefetch window)
    and the running module's own (two of the largest, a bound), within stage3_max_live_parameters
    and the tensors there are."""
    numels = sorted((t.numel() for t in managed), reverse=True)
    bound = zero.stage3_prefetch_bucket_size + sum(numels[:2])
    return min(sum(numels), bound, max(zero.stage3_max_live_parameters, numels[0]))


def _nvme_tiers(owned, offload, keep_masters: bool, state: int, kernel: bool) -> dict[str, int]:
    """The host ring and the swap file of one rank, as build_nvme_update allocates them."""
    from memfit.offload.nvme_kernel import optimizer_swap_bytes
    from memfit.offload.swap_space import ALIGN_ELEMENTS, plan_subgroups, swap_file_bytes

    numels = [t.numel() for _, t in owned]
    kinds = 3 if keep_masters else 2
    if kernel:
        buffer_elements = offload.buffer_size // 4 // ALIGN_ELEMENTS * ALIGN_ELEMENTS
        num_groups = len(plan_subgroups(numels, [kinds] * len(numels), buffer_elements))
        host = max(1, min(offload.buffer_count, num_groups)) * buffer_elements * 4
        return {"host": host, "nvme": swap_file_bytes(sum(kinds * align_up(max(4 * n, 1)) for n in numels))}
    total = 4 * sum(numels) + state
    host = min(total, (offload.buffer_count + 1) * offload.buffer_size) if owned else 0
    return {"host": host, "nvme": swap_file_bytes(optimizer_swap_bytes(numels, keep_masters, state))}


def _optimizer_name(cfg) -> str:
    return cfg.optimizer.type if cfg.optimizer is not None else "AdamW"


def _numel(shape) -> int:
    return torch.Size(shape).numel()


def _optimizer_state_bytes(cfg, owned, trainable, offloaded: bool, client_optimizer: bool) -> tuple[int, str | None]:
    """The state the rank's optimizer will hold once every owned tensor has stepped."""
    from memfit.optim.groups import model_layout
    from memfit.optim.planned_state import planned_state_bytes
    from memfit.optim.registry import build_optimizer, find_optimizer

    name = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
    params = dict(cfg.optimizer.params) if cfg.optimizer is not None else {}
    if not owned:
        return 0, None
    numel = sum(t.numel() for _, t in owned)
    if client_optimizer:
        return 8 * numel, "optimizer passed to initialize: its state counted as Adam's, 8 bytes per parameter"
    if find_optimizer(name) == "CPUAdamW" or (offloaded and runs_on_kernel(name)):
        return 8 * numel, None  # CPUAdamW: two fp32 moments
    masters = [(n, torch.nn.Parameter(torch.empty(t.shape, device="meta"))) for n, t in owned]
    with model_layout(trainable):  # as in initialize: GaLore and FRUGAL decide on the whole model
        optimizer = build_optimizer(name, masters, params)
    if hasattr(optimizer, "planned_state_bytes"):
        return optimizer.planned_state_bytes(), None
    if "betas" in optimizer.defaults or isinstance(optimizer, torch.optim.SGD):
        # the Adam family's moments (amsgrad's third included), SGD's momentum; torch's step tensors
        scalar_steps = 4 * len(owned) if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) else 0
        return planned_state_bytes(optimizer) + scalar_steps, None
    return 0, f"optimizer {name}: state size unknown, counted as 0"


def deepspeed_zero2_estimate(total_params: int, world_size: int, offload: bool) -> dict[str, int]:
    """DeepSpeed's estimate_zero2_model_states_mem_needs (one node, additional_buffer_factor 1.5),
    per GPU and for the CPU of the node."""
    factor = 1.5
    if offload:
        return {"device": 2 * total_params, "host": int(total_params * max(4 * world_size, 16) * factor)}
    return {"device": 4 * total_params + int(16 * total_params / world_size), "host": int(total_params * 4 * factor)}


def format_table(estimates: list[RankEstimate], deepspeed: dict[str, int] | None = None) -> str:

    tiers = ["device", "host"] + (["nvme"] if any("nvme" in e.tiers for e in estimates) else [])
    header = ["rank", "params", "grads", "(staging)", "fp32 masters", "optimizer state", *tiers]
    rows = [
        [str(e.rank), format_bytes(e.bytes["params"]), format_bytes(e.bytes["grads"]), format_bytes(e.grad_staging)]
        + [format_bytes(e.bytes[c]) for c in CATEGORIES[2:]]
        + [format_bytes(e.tiers[t]) for t in tiers]
        for e in estimates
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    if deepspeed is not None:
        lines.append(
            f"DeepSpeed ZeRO-2 estimate for the same model: device {format_bytes(deepspeed['device'])} per rank, "
            f"host {format_bytes(deepspeed['host'])} per node"
        )
    for note in sorted({note for e in estimates for note in e.notes}):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def available_host_bytes() -> int:
    """Memory this process can still take: the system's available memory, or less where a
    cgroup (a container, a scheduler's job) limits it."""
    available = psutil.virtual_memory().available
    room = _cgroup_room()
    return min(available, room) if room is not None else available


def _cgroup_room() -> int | None:
    try:
        with open("/proc/self/cgroup") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            limit_file, usage_file = f"/sys/fs/cgroup{path}/memory.max", f"/sys/fs/cgroup{path}/memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            base = f"/sys/fs/cgroup/memory{path}"
            limit_file, usage_file = f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes"
        else:
            continue
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                limit_text, usage_bytes = limit.read().strip(), int(usage.read())
        except (OSError, ValueError):
            continue
        if limit_text != "max" and int(limit_text) < (1 << 60):
            return max(int(limit_text) - usage_bytes, 0)
    return None


def host_check_applies(cfg, device_type: str) -> bool:
    """Whether host_memory_problem has anything to check: a host tier, a swap file, or a model
    on the CPU (whose gradients and optimizer state are RAM too)."""
    offload = cfg.zero_optimization.offload_optimizer
    param_nvme = cfg.zero_optimization.stage == 3 and cfg.zero_optimization.offload_param.device == "nvme"
    return offload.device != "none" or device_type == "cpu" or param_nvme


def host_memory_problem(
    shapes,
    cfg,
    world_size: int,
    rank: int,
    local_world_size: int,
    device_type: str,
    client_optimizer: bool = False,
    activations: dict[str, int] | None = None,
    freed_before_swap: dict[str, int] | None = None,
):
    """A ConfigError message if the ranks on this node would need more host memory than is
    available (the host tier, and on a CPU machine also gradients, masters and optimizer state;
    the parameters exist already), with the estimate as a table; None if it fits. activations:
    the {"device", "host"} bytes of one micro-batch's activations per rank where they are known
    (memfit.runtime.activations), whose host share counts too."""
    offload = cfg.zero_optimization.offload_optimizer
    param_nvme = cfg.zero_optimization.stage == 3 and cfg.zero_optimization.offload_param.device == "nvme"
    if not host_check_applies(cfg, device_type):
        return None
    estimates = estimate(shapes, cfg, world_size, client_optimizer, device_type)
    first = rank - rank % local_world_size
    local = estimates[first : first + local_world_size]
    if offload.device == "nvme" or param_nvme:
        from memfit.offload.swap_space import nvme_path_problem

        needs = {}  # nvme_path -> (the key naming it, bytes); the two swap files may share a directory
        if offload.device == "nvme":
            optimizer_swap = sum(item.tiers["nvme"] - item.param_swap for item in local)
            needs[offload.nvme_path] = ("zero_optimization.offload_optimizer.nvme_path", optimizer_swap)
        if param_nvme:
            path = cfg.zero_optimization.offload_param.nvme_path
            key, needed = needs.get(path, ("zero_optimization.offload_param.nvme_path", 0))
            needs[path] = (key, needed + sum(item.param_swap for item in local))
        freed = {os.path.realpath(d): n for d, n in (freed_before_swap or {}).items()}
        for path, (key, needed) in needs.items():
            # a birth file (memfit.zero_init) is deleted before the optimizer's swap file is made
            problem = nvme_path_problem(path, needed - freed.get(os.path.realpath(path), 0), key)
            if problem is not None:
                return problem
    needed = 0
    activation_host_bytes = activations["host"] if activations is not None else 0
    for item in local:
        needed += item.tiers["host"] + activation_host_bytes
        if device_type == "cpu":
            needed += item.tiers["device"] - item.bytes["params"] + item.gathered_peak
    available = available_host_bytes()
    if needed <= available:
        return None
    with_activations = (
        f"\nand one micro-batch's activations: {format_bytes(activation_host_bytes)} of host memory per rank"
        if activations is not None
        else ""
    )
    return (
        f"host memory: the {len(local)} rank(s) on this node need {format_bytes(needed)} more, "
        f"{format_bytes(available)} is available; estimate per rank:\n{format_table(local)}{with_activations}"
    )
