"""Optimizer offload: memfit ZeRO-2 with offload_optimizer "cpu" (the host tier, fused CPU AdamW)
against DeepSpeed ZeRO-2 with offload_optimizer "cpu" (ZeRO-Offload, DeepSpeedCPUAdam) on the
example's LLaMA-style decoder (~200M parameters by default), bf16 compute, AdamW, clipping 1.0,
the same model, data and batch, at 1 and 2 ranks.

Each setup runs in its own torchrun job (so its peak RSS is its own); setups alternate over
--rounds rounds; the table gives the median step time over rounds and each rank's peak RSS. On a
CPU machine the whole job lives in host memory, so peak RSS is everything a rank holds.

    python benchmarks/offload_bench.py                                   # ~200M parameters
    python benchmarks/offload_bench.py --dim 256 --layers 2 --rounds 1 --no-write   # quick check
"""

import argparse
import json
import os
import subprocess
import sys

from common import command_line, deepspeed_version, machine_description, median, write_section

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offload_worker.py")


def run_setup(setup: str, world: int, args) -> dict | str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), WORKER,
               "--setup", setup, "--dim", str(args.dim), "--layers", str(args.layers), "--seq-len", str(args.seq_len),
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps)]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return (result.stderr.strip().splitlines() or ["no output"])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    setups = [(setup, world) for world in worlds for setup in ("memfit", "deepspeed")]
    runs: dict[tuple, list] = {key: [] for key in setups}
    failures: dict[tuple, str] = {}
    for round_index in range(args.rounds):
        for key in setups:
            if key in failures:
                continue
            outcome = run_setup(*key, args)
            if isinstance(outcome, str):
                failures[key] = outcome
            else:
                runs[key].append(outcome)
                print(f"round {round_index}: {key[0]} x{key[1]}: {outcome['step_s']:.2f} s", flush=True)

    params = next((r[0]["params"] for r in runs.values() if r), 0)
    rows = [
        "| setup | ranks | step time (s) | peak RSS per rank (GiB) | bytes per parameter (rank 0) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    step, rss = {}, {}
    for key in setups:
        if not runs[key]:
            continue
        step[key] = median([run["step_s"] for run in runs[key]])
        rss[key] = [median([run["ranks"][i]["peak_rss_bytes"] for run in runs[key]]) for i in range(key[1])]
        rows.append(
            f"| {key[0]} | {key[1]} | {step[key]:.2f} | {'/'.join(f'{r / 2**30:.2f}' for r in rss[key])} | "
            f"{rss[key][0] / params:.1f} |"
        )
    ratios = []
    for world in worlds:
        ours, theirs = ("memfit", world), ("deepspeed", world)
        if ours in step and theirs in step:
            ratios.append(
                f"- {world} rank(s): memfit / DeepSpeed step time {step[ours] / step[theirs]:.2f}x, "
                f"peak RSS {max(rss[ours]) / max(rss[theirs]):.2f}x"
            )
    body = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_description(),
            f"- deepspeed: {deepspeed_version()}",
            "",
            f"Decoder of {params / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers), sequence {args.seq_len}, "
            f"micro-batch {args.micro_batch}, bf16, AdamW, clipping 1.0, ZeRO-2 with offload_optimizer cpu; gloo ranks "
            f"under torchrun with the cores split between them; median over {args.rounds} round(s) of the median "
            f"of {args.steps} steps after 2 warm-up steps. DeepSpeed runs with DS_ACCELERATOR=cpu.",
            "",
            *rows,
            "",
            *ratios,
            "",
            *[f"Note: {setup} x{world} could not run: {why}" for (setup, world), why in failures.items()],
        ]
    )
    print(body)
    if not args.no_write:
        print("written to", write_section("Optimizer offload to the host (benchmarks/offload_bench.py)", body))


if __name__ == "__main__":
    main()
