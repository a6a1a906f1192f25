"""`memfit estimate`: memory per rank (parameters, gradients with their staging buffer, fp32
masters, optimizer state; per tier) for a model and a config, from tensor shapes alone, as
memfit.initialize will lay it out, with DeepSpeed's ZeRO-2 estimate beside it.

    memfit estimate --params 7e9 --config ds.json --world-size 8
    memfit estimate --model mypkg.models:build --config ds.json --world-size 2
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


def run(args) -> int:
    from memfit.config import ConfigError, engine_gaps
    from memfit.runtime.estimate import deepspeed_zero2_estimate, estimate, format_table
    from memfit.runtime.model_shapes import decoder_shapes, model_shapes, parse_count

    try:
        shapes, description = decoder_shapes(parse_count(args.params)) if args.params else model_shapes(args.model)
        cfg = _load_config(args.config, args.world_size)
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
    )
    shown = _rows_to_show(estimates)
    print(format_table(shown, deepspeed))
    if len(shown) < len(estimates):
        print(f"({len(shown)} of {len(estimates)} ranks shown: the first ones and the largest)")
    return 0


def _load_config(path: str | None, world_size: int):
    """The resolved config; a file without batch sizes gets a micro-batch of 1 (memory does not
    depend on it here: activations are not estimated)."""
    from memfit.config import ConfigError, resolve_config
    from memfit.config.read import read_config_file

    raw = read_config_file(path) if path else {}
    if isinstance(raw, dict) and not any(key in raw for key in BATCH_KEYS):
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
