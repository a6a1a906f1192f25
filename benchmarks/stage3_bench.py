"""ZeRO stage 3 on 2 gloo ranks: memfit stage 3 (and stage 2 for reference) against PyTorch FSDP2
(fully_shard per block, then the root) and DeepSpeed ZeRO-3 on the CPU, the same GPT-like stack
in bf16 with AdamW, same weights and data.

Each setup runs in its own torchrun job (so peak RSS is its own); setups alternate over
--rounds rounds and the table gives the median over rounds of each job's median step time.

    python benchmarks/stage3_bench.py --rounds 3
    python benchmarks/stage3_bench.py --rounds 1 --setups memfit-stage3 --profile   # where the time goes
"""

import argparse
import json
import os
import subprocess
import sys

from common import command_line, deepspeed_version, machine_description, median, write_section

SETUPS = ["memfit-stage3", "fsdp2", "deepspeed-3", "memfit-stage3-overlap", "memfit-stage2", "fsdp2-bf16-reduce"]
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage3_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_setup(setup: str, steps: int, warmup: int, extra: list[str]) -> dict | str:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    try:
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
                "--warmup",
                str(warmup),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return "timed out after 1200 s"
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    return (errors or result.stderr.strip().splitlines() or ["no output"])[-1]


def profile_rows(probe: dict) -> list[str]:
    rows = ["| memfit stage-3 internal (rank 0, per step) | ms | calls |", "| --- | ---: | ---: |"]
    for name, entry in sorted(probe.items(), key=lambda item: -item[1]["ms"]):
        rows.append(f"| {name} | {entry['ms']:.1f} | {entry['calls']:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--profile", action="store_true", help="time memfit's stage-3 internals (not written)")
    args = parser.parse_args()
    setups = args.setups.split(",")
    extra = ["--profile"] if args.profile else []
    results: dict[str, list] = {s: [] for s in setups}
    failures: dict[str, str] = {}
    for round_index in range(args.rounds):
        for setup in setups:
            if setup in failures:
                continue
            if setup == "deepspeed-3" and deepspeed_version() == "not installed":
                failures[setup] = "deepspeed not installed"
                continue
            outcome = run_setup(setup, args.steps, args.warmup, extra)
            if isinstance(outcome, str):
                failures[setup] = outcome
            else:
                results[setup].append(outcome)
                print(f"round {round_index}: {setup} {outcome['step_s'] * 1000:.0f} ms", flush=True)

    rows = [
        "| setup | step (ms) | forward (ms) | backward (ms) | update (ms) | peak RSS per rank (MiB) | "
        "loss, steps 1-3 (rank 0) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    step, rss = {}, {}
    for setup in setups:
        runs = results[setup]
        if not runs:
            continue
        step[setup] = median([run["step_s"] for run in runs])
        rss[setup] = [median([run["ranks"][i]["peak_rss_bytes"] for run in runs]) for i in range(2)]
        phases = " | ".join(
            f"{median([run[p] for run in runs]) * 1000:.0f}" for p in ("forward_s", "backward_s", "update_s")
        )
        losses = ", ".join(f"{loss:.4f}" for loss in runs[0]["losses"][0][:3])
        if "peak_gathered_bytes" in runs[0]["ranks"][0]:  # memfit stage 3: non-owned copies held at once
            losses += "; peak gathered " + "/".join(f"{r['peak_gathered_bytes'] / 2**20:.0f}" for r in runs[0]["ranks"])
            losses += " MiB"
        rows.append(
            f"| {setup} | {step[setup] * 1000:.0f} | {phases} | {'/'.join(f'{r / 2**20:.0f}' for r in rss[setup])} "
            f"| {losses} |"
        )
    ratios = []
    for anchor, target in (("fsdp2", 1.0), ("fsdp2-bf16-reduce", 1.0), ("deepspeed-3", 0.7)):
        if "memfit-stage3" in step and anchor in step:
            worst_rss = max(rss["memfit-stage3"]) / max(rss[anchor])
            per_round = ", ".join(
                f"{ours['step_s'] / theirs['step_s']:.2f}"
                for ours, theirs in zip(results["memfit-stage3"], results[anchor])
            )
            ratios.append(
                f"- memfit-stage3 / {anchor}: step time {step['memfit-stage3'] / step[anchor]:.2f}x "
                f"(target at most {target}x; per round {per_round}), peak RSS of the larger rank {worst_rss:.2f}x"
            )
    if args.profile and results.get("memfit-stage3"):
        ratios += ["", *profile_rows(results["memfit-stage3"][0]["ranks"][0]["probe"])]
    params = next(iter(r for r in results.values() if r))[0]["params"]
    body = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_description(),
            f"- deepspeed: {deepspeed_version()}",
            "",
            f"2 gloo ranks under torchrun (OMP_NUM_THREADS=1 each), GPT-like stack of {params / 1e6:.1f}M parameters "
            "(8 blocks, width 512, vocabulary 8192, untied head), micro-batch 4 x 128 tokens per rank, bf16 "
            "compute, AdamW (lr 1e-4, no weight decay), no clipping; median over "
            f"{args.rounds} rounds of the median of {args.steps} steps after {args.warmup} warm-up steps. "
            "memfit-stage3: overlap_comm false; memfit-stage3-overlap: overlap_comm true (the stage-3 default in memfit and DeepSpeed). "
            "memfit and DeepSpeed: persistence threshold 100000 elements, prefetch bucket 50M elements. FSDP2: "
            "fully_shard per block then the root, MixedPrecisionPolicy(param_dtype=bfloat16, "
            "reduce_dtype=float32; fsdp2-bf16-reduce: bfloat16, as memfit and DeepSpeed reduce), torch.optim.AdamW. Every setup starts from the same bf16-rounded weights. "
            "Peak RSS is ru_maxrss, which includes the whole fp32 model every rank builds before sharding.",
            "",
            *rows,
            "",
            *ratios,
            "",
            *[f"Note: {s} could not run: {why}" for s, why in failures.items()],
        ]
    )
    print(body)
    if not args.profile:
        print("written to", write_section("ZeRO stage 3, 2 gloo ranks (benchmarks/stage3_bench.py)", body))


if __name__ == "__main__":
    main()
