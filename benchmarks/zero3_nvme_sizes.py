"""Bigger than RAM with everything streamed: the example decoder at several sizes with
examples/configs/zero3_nvme.json (ZeRO stage 3 on one rank, parameters and optimizer state on
NVMe, activation checkpointing, bf16 AdamW, micro batch 1 x 256 tokens), built under
memfit.zero_init, a few optimizer steps each.

Per size: peak RSS of the job (sampled every 0.2 s, build included), the training state on disk
(16 bytes per parameter) against RAM, step times, and the bytes each step reads and writes
against the least it must move (read: optimizer state 12 B/param, weights for forward and for
the recomputing backward 2 + 2, weights and gradients for the update 2 + 2; written: state 12,
gradients 2, weights 2; with --max-in-cpu the weights kept in memory move no bytes) and against
the time the measured bytes take at `memfit bench io` bandwidth, measured in the same run on the
same directory.

    python benchmarks/zero3_nvme_sizes.py --path /nvme/dir                       # 400m 1b 2b 4b, ~40 min
    python benchmarks/zero3_nvme_sizes.py --path /nvme/dir --sizes 4b --steps 3
"""

import argparse
import json
import os
import sys

from common import command_line, machine_description, write_section

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bigger_than_ram import num_params, ram_bytes  # noqa: E402
from param_stream_bench import io_bandwidth, step_io  # noqa: E402
from stage3_memory import run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30
# bytes per parameter per step: optimizer state and gradients, then the weights (three reads, one
# write) of the parameters not kept in memory under offload_param.max_in_cpu
LEAST_READ, LEAST_WRITTEN = (12 + 2, 2 + 2 + 2), (12 + 2, 2)


def least_bytes(count: int, max_in_cpu: int | None) -> tuple[float, float]:
    """(read, written) per step at least, for count parameters."""
    stored = count - min(count, max_in_cpu or 0)
    return tuple(moved * count + weights * stored for moved, weights in (LEAST_READ, LEAST_WRITTEN))


def example_config(path: str, max_in_cpu: int | None = None) -> dict:
    with open(os.path.join(ROOT, "examples", "configs", "zero3_nvme.json")) as file:
        config = json.load(file)
    for key in ("offload_param", "offload_optimizer"):
        config["zero_optimization"][key]["nvme_path"] = path
    if max_in_cpu is not None:
        config["zero_optimization"]["offload_param"]["max_in_cpu"] = max_in_cpu
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="nvme_path: a directory with 16 bytes per parameter free")
    parser.add_argument("--sizes", nargs="+", default=["400m", "1b", "2b", "4b"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--io-size", default="2G")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--max-in-cpu",
        type=float,
        help="offload_param.max_in_cpu: parameter elements kept in memory (DeepSpeed's default: 1e9; memfit's: 0)",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    write_gibs, read_gibs = io_bandwidth(args.path, args.io_size)
    lines = [
        "| model | parameters | state on disk / RAM | peak RSS | step times (s) | read per step (least) | "
        "written per step (least) | at bench io bandwidth | losses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in args.sizes:
        count = num_params(preset)
        max_in_cpu = None if args.max_in_cpu is None else int(args.max_in_cpu)
        result = run(example_config(args.path, max_in_cpu), preset, args.path, args.steps, args.timeout)
        print(preset, result, flush=True)
        if "error" in result:
            lines.append(f"| {preset} | {count / 1e9:.2f}B | | failed: {result['error'][-300:]!r} | | | | | |")
            continue
        read_bytes, written_bytes, io_s = step_io(result, write_gibs, read_gibs)
        least_read, least_written = least_bytes(count, max_in_cpu)
        lines.append(
            f"| {preset} | {count / 1e9:.2f}B | {16 * count / GIB:.0f} GiB = {16 * count / ram_bytes():.1f}x | "
            f"{result['peak_rss_bytes'] / GIB:.2f} GiB | {result['step_time_s']} | "
            f"{read_bytes / GIB:.1f} GiB ({least_read / GIB:.1f}) | "
            f"{written_bytes / GIB:.1f} GiB ({least_written / GIB:.1f}) | {io_s:.1f} s | {result['losses']} |"
        )
    text = "\n".join(
        [
            f"- machine: {machine_description(args.path)}",
            f"- command: `{command_line()}`",
            f"- load average before: {', '.join(f'{x:.1f}' for x in load_before)}; "
            f"after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
            f"- `memfit bench io` (io_uring, {args.io_size}): write {write_gibs:.2f} GiB/s, read {read_gibs:.2f} GiB/s",
            f"- RAM {ram_bytes() / GIB:.1f} GiB; config examples/configs/zero3_nvme.json"
            + ("" if args.max_in_cpu is None else f" with offload_param.max_in_cpu {args.max_in_cpu:.0e}")
            + f", {args.steps} steps per size",
            "",
            *lines,
        ]
    )
    print(text)
    if not args.no_write:
        print("written to", write_section("Everything streamed: ZeRO-3 on NVMe at several sizes", text))


if __name__ == "__main__":
    main()
