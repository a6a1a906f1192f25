"""ZeRO on 2 gloo ranks: memfit stages 0/1/2 against DDP + ZeroRedundancyOptimizer and DeepSpeed
ZeRO-1/2 on the CPU, same 25M-parameter MLP stack, micro-batch 16, AdamW.

Each setup runs in its own torchrun job (so peak RSS is its own); setups alternate over
--rounds rounds and the table gives the median step time over rounds.

    python benchmarks/zero_bench.py --rounds 3
"""

import argparse
import json
import os
import subprocess
import sys

from common import command_line, deepspeed_version, machine_description, median, write_section

SETUPS = [
    "memfit-stage0",
    "memfit-stage1",
    "memfit-stage2",
    "memfit-stage2-overlap",
    "ddp+zero",
    "deepspeed-1",
    "deepspeed-2",
]
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zero_worker.py")


def run_setup(setup: str, steps: int) -> dict | str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            WORKER,
            "--setup",
            setup,
            "--steps",
            str(steps),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return (result.stderr.strip().splitlines() or ["no output"])[-1]


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--setups", default=",".join(SETUPS))
    args = parser.parse_args()
    setups = args.setups.split(",")
    results: dict[str, list] = {s: [] for s in setups}
    failures: dict[str, str] = {}
    for round_index in range(args.rounds):
        for setup in setups:
            if setup in failures:
                continue
            outcome = run_setup(setup, args.steps)
            if isinstance(outcome, str):
                failures[setup] = outcome
            else:
                results[setup].append(outcome)
                print(f"round {round_index}: {setup} {outcome['step_s'] * 1000:.0f} ms", flush=True)

    rows = [
        "| setup | step time (ms) | optimizer state per rank (MiB) | state / (total/N) | gradients per rank (MiB) "
        "| peak RSS per rank (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    total_state = None
    if results.get("memfit-stage0"):
        total_state = results["memfit-stage0"][0]["ranks"][0]["optimizer_state_bytes"]
    for setup in setups:
        if not results[setup]:
            continue
        runs = results[setup]
        ranks = runs[0]["ranks"]
        state = [r["optimizer_state_bytes"] for r in ranks]
        share = "/".join(f"{s / (total_state / 2):.3f}" for s in state) if total_state else "n/a"
        rss = "/".join(f"{median([run['ranks'][i]['peak_rss_bytes'] for run in runs]) / 2**20:.0f}" for i in range(2))
        rows.append(
            f"| {setup} | {median([run['step_s'] for run in runs]) * 1000:.0f} | "
            f"{'/'.join(mib(s) for s in state)} | {share} | {'/'.join(mib(r['grad_bytes']) for r in ranks)} | {rss} |"
        )
    step = {s: median([run["step_s"] for run in results[s]]) for s in setups if results[s]}
    ratios = []
    for ours in ("memfit-stage2", "memfit-stage2-overlap"):
        if ours in step and "ddp+zero" in step:
            ratios.append(f"- {ours} / DDP+ZeroRedundancyOptimizer step time: {step[ours] / step['ddp+zero']:.2f}x")
        for ds in ("deepspeed-1", "deepspeed-2"):
            if ours in step and ds in step:
                ratios.append(f"- {ours} / {ds} step time: {step[ours] / step[ds]:.2f}x")
    params = next(iter(r for r in results.values() if r))[0]["params"]
    body = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_description(),
            f"- deepspeed: {deepspeed_version()}",
            "",
            f"2 gloo ranks under torchrun (OMP_NUM_THREADS=1 each), MLP stack of {params / 1e6:.1f}M parameters, "
            f"micro-batch 16, AdamW, no clipping; median over {args.rounds} rounds of the median of {args.steps} "
            "steps after 3 warm-up steps. Gradients per rank: bytes held after reduction (memfit), .grad "
            "tensors (DDP); n/a where the runtime keeps them in internal buffers.",
            "",
            *rows,
            "",
            *ratios,
            "",
            *[f"Note: {s} could not run: {why}" for s, why in failures.items()],
        ]
    )
    print(body)
    print("written to", write_section("ZeRO, 2 gloo ranks (benchmarks/zero_bench.py)", body))


if __name__ == "__main__":
    main()
