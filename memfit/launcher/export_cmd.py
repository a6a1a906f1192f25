"""`memfit export CHECKPOINT_DIR OUT`: a checkpoint of any stage, world size, offload tier and
optimizer as one state dict under the model's parameter names, which `model.load_state_dict`
and `safetensors.torch.load_file` read (see memfit/checkpointing/export.py)."""

import sys

EXIT_BAD = 2


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ValueError(f"--max-shard-size: expected bytes such as 5GB or 500MiB, got {text!r}")


def add_arguments(commands) -> None:
    export = commands.add_parser("export", help="a checkpoint as one model state dict (safetensors or torch)")
    export.add_argument("checkpoint_dir", help="a save directory (its 'latest' tag) or one tag directory")
    export.add_argument(
        "out", help="output directory: model.safetensors (or shards and an index), or pytorch_model.bin"
    )
    export.add_argument("--format", choices=("safetensors", "torch"), default="safetensors")
    export.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of floating-point tensors")
    export.add_argument("--tag", default=None, help="the tag to export (default: the one 'latest' names)")
    export.add_argument(
        "--max-shard-size", default="5GB", help="safetensors: split into files of at most this size (default 5GB)"
    )


def run(args) -> int:
    from memfit.checkpointing.export import export_checkpoint
    from memfit.checkpointing.integrity import CheckpointError

    try:
        written = export_checkpoint(
            args.checkpoint_dir,
            args.out,
            fmt=args.format,
            dtype=args.dtype,
            tag=args.tag,
            max_shard_bytes=_size(args.max_shard_size),
        )
    except (CheckpointError, ValueError, OSError) as error:
        print(f"memfit export: {error}", file=sys.stderr)
        return EXIT_BAD
    for path in written:
        print(path)
    return 0
