"""`memfit estimate`: memory per rank (parameters, gradients with their staging buffer, fp32
masters, optimizer state; per tier) for a model and a config, from tensor shapes alone, as
memfit.initialize will lay it out, with DeepSpeed's ZeRO-2 estimate beside it. With snapshots on,
the shared memory their slots and their parity take. For a --model, the activations of one
micro-batch, traced on fake tensors (memfit.runtime.activations), with and without activation
checkpointing.

    memfit estimate --params 7e9 --config ds.json --world-size 8
    memfit estimate --model mypkg.models:build --config ds.json --world-size 2 --seq-len 2048
    memfit estimate --model examples.gpt_model:small --config ds.json --micro-batch-size 8
    memfit estimate --params 1B --config snap.json --world-size 8 --nodes 4
"""

import sys

from memfit.launcher.config_cmd import positive_int

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
MAX_ROWS = 16


def add_arguments(commands) -> None:
    estimate = commands.add_parser("estimate", help="memory per rank and tier for a model and a config")
    model = estimate.add_mutually_exclusive_group(required=True)
    model.add_argument("--params", help="a parameter count (7e9, 7B, 125M): plans for a LLaMA-style decoder that size")
    model.add_argument("--model", help="module:factory building the model (called on the meta device)")
    estimate.add_argument("--config", help="a memfit or DeepSpeed JSON config (default: AdamW, no ZeRO)")
    estimate.add_argument("--world-size", type=positive_int, default=1, help="data-parallel ranks (default 1)")
    estimate.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="where the model runs (default cuda)"
    )
    estimate.add_argument(
        "--nodes", type=positive_int, default=1, help="nodes the ranks are spread over (default 1; for snapshot parity)"
    )
    estimate.add_argument(
        "--micro-batch-size",
        type=int,
        help="samples per rank and forward, for the activations (default: the config's train_micro_batch_size_per_gpu)",
    )
    estimate.add_argument(
        "--seq-len",
        type=int,
        help="sequence length of one sample, for the activations (default: the model's memfit_example_inputs decides)",
    )


def run(args) -> int:
    from memfit.config import ConfigError, engine_gaps
    from memfit.runtime.estimate import deepspeed_zero2_estimate, estimate, format_table, shapes_of
    from memfit.runtime.model_shapes import build_on_meta, decoder_shapes, load_factory, parse_count

    model = None
    try:
        for flag, value in (("--micro-batch-size", args.micro_batch_size), ("--seq-len", args.seq_len)):
            if value is not None and value < 1:
                raise ValueError(f"{flag}: expected a positive integer, got {value}")
        if args.world_size % args.nodes:
            raise ValueError(f"--world-size {args.world_size} is not a multiple of --nodes {args.nodes}")
        if args.params:
            shapes, description = decoder_shapes(parse_count(args.params))
        else:
            model = build_on_meta(args.model, load_factory(args.model))
            shapes = shapes_of(model)
            total = sum(_numel(shape) for _, shape, _ in shapes)
            description = f"{args.model}: {total:,} parameters in {len(shapes)} tensors"
        cfg = _load_config(args.config, args.world_size, args.micro_batch_size)
        gaps = engine_gaps(cfg, args.world_size)
        if gaps:
            raise ConfigError(gaps, args.config or "config")
    except (ValueError, OSError) as error:  # ConfigError is a ValueError
        print(f"memfit estimate: {error}", file=sys.stderr)
        return 2
    estimates = estimate(shapes, cfg, args.world_size, device_type=args.device)
    total = sum(_numel(shape) for _, shape, _ in shapes)
    zero = cfg.zero_optimization
    deepspeed = None
    if zero.stage in (1, 2):
        deepspeed = deepspeed_zero2_estimate(total, args.world_size, zero.offload_optimizer.device == "cpu")
    optimizer = cfg.optimizer.type if cfg.optimizer is not None else "AdamW"
    precision = "bf16" if cfg.bf16.enabled else "fp16" if cfg.fp16.enabled else "fp32"
    print(f"model: {description}")
    print(
        f"setup: {args.world_size} rank(s) on {args.device}, ZeRO stage {zero.stage}, {precision}, {optimizer}, "
        f"offload_optimizer {zero.offload_optimizer.device}"
        + (f", offload_param {zero.offload_param.device}" if zero.stage == 3 else "")
    )
    shown = _rows_to_show(estimates)
    print(format_table(shown, deepspeed))
    if len(shown) < len(estimates):
        print(f"({len(shown)} of {len(estimates)} ranks shown: the first ones and the largest)")
    for line in activation_lines(model, cfg, estimates, args):
        print(line)
    for line in snapshot_lines(estimates, cfg.snapshot, args.nodes, args.world_size // args.nodes):
        print(line)
    return 0


def activation_lines(model, cfg, estimates, args) -> list[str]:
    """The activations of one micro-batch per rank (every rank the same), as configured and the
    other way for comparison, and the largest rank's tiers with them; why there are none."""
    import torch

    from memfit.runtime.activations import describe, trace_model
    from memfit.units import format_bytes

    if model is None:
        return [
            "activations: not estimated for --params (a layout, no model to run); give --model, "
            "like examples.gpt_model:small"
        ]
    _, micro_batch_size, _ = cfg.batch_sizes(args.world_size)
    compute_dtype = torch.bfloat16 if cfg.bf16.enabled else torch.float16 if cfg.fp16.enabled else None
    blocks = cfg.memfit.checkpoint_blocks
    try:
        traced = trace_model(model, micro_batch_size, blocks, args.seq_len, compute_dtype, device="cpu")
    except ValueError as error:
        return [f"activations: not estimated: {error}"]
    checkpointed = blocks is not None and traced.num_blocks > 0
    cpu_checkpointing = cfg.activation_checkpointing.cpu_checkpointing
    lines = [
        f"activations: traced, one forward and backward on fake tensors (nothing allocated, CPU kernels) of a "
        f"micro-batch of {micro_batch_size}: {traced.inputs}",
        *describe(traced, checkpointed, cpu_checkpointing, args.device),
    ]
    tiers = traced.tiers(checkpointed, cpu_checkpointing, args.device)
    device = max(e.tiers["device"] for e in estimates) + tiers["device"]
    host = max(e.tiers["host"] for e in estimates) + tiers["host"]
    if args.device == "cpu":
        lines.append(f"per rank with activations, at most: {format_bytes(device + host)} of RAM")
    else:
        lines.append(f"per rank with activations, at most: device {format_bytes(device)}, host {format_bytes(host)}")
    return lines + [f"note: {note}" for note in traced.notes]


def snapshot_lines(estimates, snapshot, num_nodes: int, ranks_per_node: int) -> list[str]:
    """The shared memory of snapshot slots and parity, for the largest rank and per node."""
    from memfit.checkpointing.parity import PARITY_SLOTS_PER_RANK
    from memfit.checkpointing.slots import SLOTS_PER_RANK
    from memfit.units import format_bytes

    if not snapshot.interval_steps:
        return []
    # a snapshot keeps the fp32 value and the optimizer state of each owned tensor
    slot_bytes = max(4 * e.owned_numel + e.bytes["optimizer_state"] for e in estimates)
    lines = [
        f"snapshot slots: {SLOTS_PER_RANK} x {format_bytes(slot_bytes)} = {format_bytes(SLOTS_PER_RANK * slot_bytes)} "
        f"of shared memory per rank, {format_bytes(SLOTS_PER_RANK * slot_bytes * ranks_per_node)} per node"
    ]
    if snapshot.parity != "xor":
        return lines
    if num_nodes < 2:
        return lines + ['snapshot parity "xor": needs two or more nodes (--nodes); off with one node']
    parity_bytes = -(-slot_bytes // (num_nodes - 1))
    share = "a full copy of the other node's snapshot" if num_nodes == 2 else f"1/{num_nodes - 1} of the snapshot"
    return lines + [
        f'snapshot parity memory ("xor" over {num_nodes} nodes): {PARITY_SLOTS_PER_RANK} x '
        f"{format_bytes(parity_bytes)} = {format_bytes(PARITY_SLOTS_PER_RANK * parity_bytes)} per rank ({share}), "
        f"{format_bytes(PARITY_SLOTS_PER_RANK * parity_bytes * ranks_per_node)} per node"
    ]


def _load_config(path: str | None, world_size: int, micro_batch_size: int | None = None):
    """The resolved config; micro_batch_size replaces the file's batch sizes (its accumulation
    steps kept), and a file without any gets a micro-batch of 1."""
    from memfit.config import ConfigError, resolve_config
    from memfit.config.read import read_config_file

    raw = read_config_file(path) if path else {}
    if isinstance(raw, dict) and micro_batch_size is not None:
        raw = {key: value for key, value in raw.items() if key != "train_batch_size"}
        raw["train_micro_batch_size_per_gpu"] = micro_batch_size
    elif isinstance(raw, dict) and not any(key in raw for key in BATCH_KEYS):
        raw = {**raw, "train_micro_batch_size_per_gpu": 1}
    try:
        return resolve_config(raw, world_size).config
    except ConfigError as error:
        raise ConfigError(error.problems, path or "config") from None


def _rows_to_show(estimates):
    """Every rank up to MAX_ROWS; beyond, the first ranks and the ranks with the largest device
    and host totals."""
    if len(estimates) <= MAX_ROWS:
        return estimates
    largest = {max(estimates, key=lambda e: e.tiers[tier]).rank for tier in ("device", "host")}
    keep = set(range(MAX_ROWS - 2)) | largest
    return [e for e in estimates if e.rank in keep]


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
