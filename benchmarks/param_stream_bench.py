"""What streaming parameters costs: the stage-3 step on one rank with parameters and optimizer
state on NVMe, reading ahead (stage3-nvme-prefetch), against the same step with the parameters
in memory (stage3-resident), and against the time the bytes the step moves take at `memfit bench
io` bandwidth (io_uring, measured in the same run on the same directory). The example decoder, bf16, AdamW, micro batch
1 x 256 tokens; step times are the median over the steps after the first.

    overhead = stage3-nvme-prefetch step
               / max(stage3-resident step, read bytes / read GiB/s + written bytes / write GiB/s)

    python benchmarks/param_stream_bench.py --path /nvme/dir            # 400m, ~10 min
"""

import argparse
import os
import statistics
import subprocess
import sys

from common import command_line, machine_description, write_section

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage3_memory import run  # noqa: E402

GIB = 1 << 30


def io_bandwidth(path: str, size: str) -> tuple[float, float]:
    """(write, read) GiB/s of `memfit bench io` with io_uring on path."""
    command = [sys.executable, "-m", "memfit.launcher.cli", "bench", "io", "--path", path, "--size", size]
    command += ["--backend", "io_uring", "--no-fio"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    row = [line.split() for line in output.splitlines() if line.startswith("io_uring ")][-1]
    return float(row[1]), float(row[2])


def step_io(result: dict, write_gibs: float, read_gibs: float) -> tuple[float, float, float]:
    """(bytes read, bytes written, seconds at bench io bandwidth) of a run's median step after the
    first (whose state is new)."""
    later = result["nvme_bytes"][1:] or result["nvme_bytes"]
    read_bytes = statistics.median(read for read, _ in later)
    written_bytes = statistics.median(written for _, written in later)
    return read_bytes, written_bytes, read_bytes / GIB / read_gibs + written_bytes / GIB / write_gibs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="nvme_path for the swap files and the I/O test")
    parser.add_argument("--preset", default="400m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--io-size", default="2G")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    write_gibs, read_gibs = io_bandwidth(args.path, args.io_size)
    results = {setup: run(setup, args.preset, args.path, args.steps, args.timeout) for setup in SETUPS}
    for setup, result in results.items():
        if "error" in result:
            raise SystemExit(f"{setup}: {result['error']}")
    medians = {setup: statistics.median(r["step_time_s_exact"][1:]) for setup, r in results.items()}
    io_s = step_io(results["stage3-nvme-prefetch"], write_gibs, read_gibs)[2]
    floor = max(medians["stage3-resident"], io_s)
    lines = [
        "| setup | step (s, median) | read per step | written per step | losses |",
        "|---|---|---|---|---|",
    ]
    for setup, result in results.items():
        reads, writes, _ = step_io(result, write_gibs, read_gibs)
        lines.append(
            f"| {setup} | {medians[setup]:.2f} | {reads / GIB:.2f} GiB | {writes / GIB:.2f} GiB | {result['losses']} |"
        )
    text = "\n".join(
        [
            f"- machine: {machine_description(args.path)}",
            f"- command: `{command_line()}`",
            f"- load average before: {', '.join(f'{x:.1f}' for x in load_before)}; "
            f"after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
            f"- `memfit bench io` (io_uring, {args.io_size}): write {write_gibs:.2f} GiB/s, read {read_gibs:.2f} GiB/s",
            "",
            *lines,
            "",
            f"- the stage3-nvme-prefetch step's bytes at bench io bandwidth: {io_s:.2f} s",
            f"- overhead: {medians['stage3-nvme-prefetch']:.2f} s / max({medians['stage3-resident']:.2f}, {io_s:.2f}) = "
            f"**{medians['stage3-nvme-prefetch'] / floor:.2f}x** (target at most 1.3x)",
        ]
    )
    print(text)
    if not args.no_write:
        print(
            "written to",
            write_section(f"Parameter streaming overhead, {args.preset} (benchmarks/param_stream_bench.py)", text),
        )


SETUPS = ["stage3-resident", "stage3-nvme-prefetch"]

if __name__ == "__main__":
    main()
