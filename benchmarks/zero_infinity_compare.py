"""memfit with everything streamed against DeepSpeed ZeRO-Infinity, side by side in one run: the
example decoder at one preset, examples/configs/zero3_nvme.json for memfit (zero3_nvme_sizes.py)
and its DeepSpeed translation (zero_infinity_deepspeed.py), one job after the other, alternating
for --rounds rounds, load averages recorded around each job.

memfit runs twice per round: with offload_param.max_in_cpu at DeepSpeed's default (1e9 elements:
the same 16-bit weights in RAM as DeepSpeed keeps) and at memfit's default (0: every weight on
NVMe). Reported: peak RSS of each job's process tree, the median step time, and both as ratios
to DeepSpeed's.

    python benchmarks/zero_infinity_compare.py --preset 400m --path /nvme/memfit --ds-path /nvme/ds
"""

import argparse
import json
import os
import subprocess
import sys

from common import command_line, machine_description, median, write_section

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage3_memory import run  # noqa: E402
from zero3_nvme_sizes import example_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30
DEEPSPEED_MAX_IN_CPU = 10**9


def run_deepspeed(args) -> dict:
    command = [sys.executable, os.path.join(HERE, "zero_infinity_deepspeed.py"), "--preset", args.preset]
    command += ["--steps", str(args.steps), "--nvme-path", args.ds_path, "--timeout", str(args.timeout)]
    done = subprocess.run(command, capture_output=True, text=True)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        return {"error": (done.stdout + done.stderr)[-1500:]}
    report = json.loads(results[-1][len("RESULT ") :])
    if report["status"] != "exit 0":
        return {"error": report.get("why", report["status"])}
    return {"peak_rss_bytes": report["peak_rss_gib"] * GIB, "step_time_s": report["step_s"], "losses": report["losses"]}


def run_memfit(args, max_in_cpu: int) -> dict:
    return run(example_config(args.path, max_in_cpu), args.preset, args.path, args.steps, args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="400m")
    parser.add_argument("--path", required=True, help="memfit's nvme_path")
    parser.add_argument("--ds-path", required=True, help="DeepSpeed's nvme_path (only what its runs make is removed)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--skip-memfit-default", action="store_true", help="leave out the max_in_cpu 0 run")
    args = parser.parse_args()
    setups = {f"memfit, max_in_cpu {DEEPSPEED_MAX_IN_CPU:.0e}": lambda: run_memfit(args, DEEPSPEED_MAX_IN_CPU)}
    if not args.skip_memfit_default:
        setups["memfit, max_in_cpu 0 (memfit's default)"] = lambda: run_memfit(args, 0)
    setups["DeepSpeed ZeRO-Infinity"] = lambda: run_deepspeed(args)
    results = {name: [] for name in setups}
    loads = []
    for round_index in range(args.rounds):
        for name, job in setups.items():
            before = os.getloadavg()
            result = job()
            loads.append(f"{name}, round {round_index + 1}: {before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
            print(name, json.dumps({k: v for k, v in result.items() if k != "step_time_s_exact"}), flush=True)
            results[name].append(result)
    anchor = results["DeepSpeed ZeRO-Infinity"]
    anchor_ok = [r for r in anchor if "error" not in r]
    anchor_rss = max((r["peak_rss_bytes"] for r in anchor_ok), default=float("nan"))
    anchor_step = median([s for r in anchor_ok for s in r["step_time_s"]]) if anchor_ok else float("nan")
    lines = [
        "| setup | peak RSS | step times (s) | median step | RSS / DeepSpeed | step / DeepSpeed | losses |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        done = [r for r in runs if "error" not in r]
        if not done:
            lines.append(f"| {name} | failed: {runs[0]['error'][-300:]!r} | | | | | |")
            continue
        rss = max(r["peak_rss_bytes"] for r in done)
        steps = [s for r in done for s in r["step_time_s"]]
        lines.append(
            f"| {name} | {rss / GIB:.2f} GiB | {steps} | {median(steps):.2f} | {rss / anchor_rss:.2f}x | "
            f"{median(steps) / anchor_step:.2f}x | {[r['losses'] for r in done]} |"
        )
    text = "\n".join(
        [
            f"- machine: {machine_description(args.path)}",
            f"- command: `{command_line()}`",
            f"- preset {args.preset}, {args.steps} steps per job, {args.rounds} round(s); load average (1 min) "
            "before -> after each job:",
            *[f"  - {line}" for line in loads],
            "",
            *lines,
        ]
    )
    print(text)
    if not args.no_write:
        title = f"Everything streamed against ZeRO-Infinity, {args.preset}, side by side (zero_infinity_compare.py)"
        print("written to", write_section(title, text))


if __name__ == "__main__":
    main()
