"""Quality of the low-rank optimizers: train the example's `small` preset for a fixed number of
steps with AdamW, GaLoreAdamW and FRUGAL on the default corpus (same data, seed, schedule and lr)
and compare the final validation losses.

    python benchmarks/converge.py --steps 200
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import command_line, machine_description, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 0.003


def optimizers(steps: int, dim: int) -> dict:
    """Row name -> optimizer config. The main three run at LR and LR / 3, so each is also
    compared at the better of the two."""
    gap = max(steps // 4, 1)
    adam = {"betas": [0.9, 0.95]}
    galore = {**adam, "rank": dim // 4, "update_proj_gap": gap, "scale": 1.0}
    frugal = {**adam, "density": 0.25, "update_gap": gap}
    rows = {}
    for lr in (LR, LR / 3):
        rows[f"AdamW, lr {lr:.0e}"] = {"type": "AdamW", "params": {**adam, "lr": lr, "weight_decay": 0.0}}
        rows[f"GaLoreAdamW (randomized, default), lr {lr:.0e}"] = {
            "type": "GaLoreAdamW",
            "params": {**galore, "lr": lr},
        }
        rows[f"FRUGAL (blockwise, density 0.25), lr {lr:.0e}"] = {"type": "FRUGAL", "params": {**frugal, "lr": lr}}
    rows[f"GaLoreAdamW (svd), lr {LR:.0e}"] = {
        "type": "GaLoreAdamW",
        "params": {**galore, "lr": LR, "projector": "svd"},
    }
    rows[f"GaLoreAdamW (randomized, bf16 projection), lr {LR:.0e}"] = {
        "type": "GaLoreAdamW",
        "params": {**galore, "lr": LR, "proj_dtype": "bfloat16"},
    }
    return rows


def train(name: str, optimizer: dict, args, workdir: str) -> list[dict]:
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "seed": 1234,
        "steps_per_print": 10,
        "optimizer": optimizer,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": args.steps,
                "warmup_num_steps": args.steps // 10,
                "warmup_type": "linear",
                "cos_min_ratio": 0.1,
            },
        },
    }
    slug = "".join(c if c.isalnum() else "_" for c in name)
    config_path, metrics = os.path.join(workdir, f"{slug}.json"), os.path.join(workdir, f"{slug}.jsonl")
    with open(config_path, "w") as f:
        json.dump(config, f)
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "train_gpt.py"),
            "--config",
            config_path,
            "--preset",
            args.preset,
            "--max-steps",
            str(args.steps),
            "--eval-every",
            str(args.steps),
            "--eval-batches",
            str(args.eval_batches),
            "--metrics",
            metrics,
        ],
        check=True,
        cwd=workdir,
    )
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=16)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt_model import PRESETS

    dim = PRESETS[args.preset].dim
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, optimizer in optimizers(args.steps, dim).items():
            records = train(name, optimizer, args, workdir)
            results[name] = (
                optimizer["params"]["lr"],
                records[0]["loss"],
                records[-1]["loss"],
                records[-1]["val_loss"],
                records[-1]["memory"]["optimizer_state"],
            )
    adamw_at = {lr: val for name, (lr, _, _, val, _) in results.items() if name.startswith("AdamW")}
    best_adamw = min(adamw_at.values())
    rows = [
        "| optimizer | first loss | last train loss | final val loss | val - AdamW at this lr | val - best AdamW "
        "| optimizer state (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (lr, first, last, val, state) in results.items():
        rows.append(
            f"| {name} | {first:.3f} | {last:.3f} | {val:.4f} | {val - adamw_at[lr]:+.4f} | {val - best_adamw:+.4f} "
            f"| {state / 2**20:.1f} |"
        )
    body = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_description(),
            "",
            f"Preset {args.preset}, {args.steps} steps, micro-batch {args.micro_batch} x seq {PRESETS[args.preset].seq_len}, "
            "one process, GaLore scale 1.0, warmup 10% then cosine to 0.1, clipping 1.0, "
            f"projector refresh every {max(args.steps // 4, 1)} steps; validation on {args.eval_batches} held-out batches.",
            "",
            *rows,
        ]
    )
    print(body)
    print("written to", write_section("Convergence on the small preset (benchmarks/converge.py)", body))


if __name__ == "__main__":
    main()
