"""How peak RSS grows with the model on one rank, everything on NVMe: the example decoder at
three sizes (base 0.11B, 400m 0.40B, 1b 1.01B), bf16, AdamW, micro batch 1 x 256 tokens, two
optimizer steps, with

  stage3-nvme   ZeRO stage 3, offload_param and offload_optimizer both "nvme"
  stage1-nvme   ZeRO stage 1 with offload_optimizer "nvme" (weights and gradients in RAM)

The slope of peak RSS against the parameter count (least squares over the sizes) is the bytes
per parameter that stay in memory; the intercept is the fixed part (interpreter, torch, buffers).

--build measures the build alone instead, in one process per size: how much peak RSS grows from
after the imports to the model built, and to the end of memfit.initialize (stage3-nvme), with the
model built in memory (eager) and under memfit.zero_init (its parameters go to NVMe as they are
registered). Both include a fixed part (the config's and the I/O engine's first use, ~90 MiB
on a small CPU box); the slope over the sizes is what the build holds per parameter.

--nproc 2 runs each setup on two ranks (data parallel, the same model on both) and reports the
peak RSS of the whole job and per rank: with the streamed step each owner writes its reduced
gradients to the swap file as a bucket's reduce completes, so no rank holds its gradients.

    python benchmarks/stage3_memory.py --path /nvme/dir        # ~20 min, ~17 GB of swap at 1b
    python benchmarks/stage3_memory.py --path /nvme/dir --build
    python benchmarks/stage3_memory.py --path /nvme/dir --nproc 2 --sizes 400m --setups stage3-nvme-checkpointed
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from common import command_line, machine_description, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bigger_than_ram import num_params, tree_rss_bytes  # noqa: E402

SIZES = ["base", "400m", "1b"]


def config(setup: str, path: str) -> dict:
    """stage3-nvme and stage1-nvme (above); stage3-nvme-prefetch: stage3-nvme reading ahead;
    stage3-nvme-checkpointed: stage3-nvme with activation checkpointing (activations without it
    grow with width x depth and dominate the slope);
    stage3-resident: stage 3 with the optimizer on NVMe and the parameters in memory (on one rank
    nothing is gathered)."""
    nvme = {"device": "nvme", "nvme_path": path}
    zero = {"stage": 1, "offload_optimizer": {**nvme, "buffer_count": 4, "buffer_size": 64 << 20}}
    if setup == "stage3-nvme":
        zero.update(stage=3, offload_param=nvme, stage3_prefetch_bucket_size=0)
    if setup == "stage3-nvme-prefetch":  # reads ahead (DeepSpeed's default prefetch bucket)
        zero.update(stage=3, offload_param=nvme)
    # gradient buckets of 20M elements (40 MB in bf16): on several ranks a rank holds a bucket's
    # gradients at a time, and the default of 500M would be the whole model's at these sizes
    zero["reduce_bucket_size"] = 20_000_000
    own = {}
    if setup == "stage3-nvme-checkpointed":  # and activation checkpointing: what grows is the streamed state's
        zero.update(stage=3, offload_param=nvme, stage3_prefetch_bucket_size=0)
        own = {"checkpoint_blocks": "auto"}
    if setup == "stage3-resident":
        zero.update(stage=3)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "weight_decay": 0.1}},
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "memfit": own,
    }


def run(setup: str | dict, preset: str, path: str, steps: int, timeout: float, nproc: int = 1) -> dict:
    """The example under memfit run with a setup's config (or a config dict), its peak RSS sampled
    (the launcher and every rank together)."""
    with tempfile.TemporaryDirectory() as directory:
        config_path = os.path.join(directory, "config.json")
        with open(config_path, "w") as file:
            json.dump(setup if isinstance(setup, dict) else config(setup, path), file)
        metrics = os.path.join(directory, "metrics.jsonl")
        command = [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", str(nproc),
                   os.path.join(ROOT, "examples", "train_gpt.py"), "--config", config_path, "--preset", preset,
                   "--max-steps", str(steps), "--eval-every", "1000000", "--metrics", metrics,
                   "--model-out", os.path.join(directory, "model.safetensors")]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": ROOT}
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        peak = [0]

        def sample():
            while process.poll() is None:
                peak[0] = max(peak[0], tree_rss_bytes(process.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return {"error": f"timeout after {timeout:.0f} s"}
        sampler.join()
        if process.returncode != 0:
            return {"error": output[-1500:]}
        records = [json.loads(line) for line in open(metrics)]
        return {
            "peak_rss_bytes": peak[0],
            "seconds": time.perf_counter() - started,
            "step_time_s": [round(r.get("step_time_s", 0), 1) for r in records],
            "step_time_s_exact": [r.get("step_time_s", 0) for r in records],
            "nvme_bytes": [(r.get("nvme_read_bytes", 0), r.get("nvme_written_bytes", 0)) for r in records],
            "losses": [r["loss"] for r in records],
        }


def build_worker(preset: str, config_path: str, deferred: bool) -> None:
    """Run in a process of its own: prints the peak RSS growth of building the model and the engine."""
    import resource

    import torch

    import memfit

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt_model import GPT, PRESETS

    with open(config_path) as file:
        cfg = json.load(file)
    with open("/proc/self/statm") as file:
        before = int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    torch.manual_seed(0)
    with memfit.zero_init(cfg) if deferred else contextlib.nullcontext():
        model = GPT(PRESETS[preset])
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memfit.initialize(model, cfg)
    initialized = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"model_growth_bytes": built - before, "initialize_growth_bytes": initialized - before}))


def run_build(preset: str, path: str, deferred: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        config_path = os.path.join(directory, "config.json")
        with open(config_path, "w") as file:
            json.dump(config("stage3-nvme", path), file)
        command = [sys.executable, os.path.abspath(__file__), "--path", path, "--build-worker", preset, config_path,
                   str(int(deferred))]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": ROOT, "MEMFIT_LOG_LEVEL": "warning"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout:.0f} s"}
        if done.returncode != 0:
            return {"error": (done.stdout + done.stderr)[-1500:]}
        return json.loads(done.stdout.strip().splitlines()[-1])


def build_table(sizes: list[str], path: str, timeout: float) -> str:
    lines = [
        "| model | parameters | build | peak RSS growth: model built | bytes/param | through initialize | bytes/param |",
        "|---|---|---|---|---|---|---|",
    ]
    points = {False: [], True: []}
    for preset in sizes:
        count = num_params(preset)
        for deferred in (False, True):
            result = run_build(preset, path, deferred, timeout)
            how = "memfit.zero_init" if deferred else "eager"
            print(preset, how, result, flush=True)
            if "error" in result:
                lines.append(f"| {preset} | {count / 1e9:.2f}B | {how} | failed: {result['error'][-200:]!r} | | | |")
                continue
            model, engine = result["model_growth_bytes"], result["initialize_growth_bytes"]
            points[deferred].append((count, model, engine))
            lines.append(
                f"| {preset} | {count / 1e9:.2f}B | {how} | {model / 2**20:.0f} MiB | {model / count:.2f} | "
                f"{engine / 2**20:.0f} MiB | {engine / count:.2f} |"
            )
    lines.append("")
    for deferred, found in points.items():
        if len(found) >= 2:
            model_slope, _ = slope([(count, model) for count, model, _ in found])
            engine_slope, _ = slope([(count, engine) for count, _, engine in found])
            lines.append(
                f"- {'memfit.zero_init' if deferred else 'eager'}: peak RSS grows by **{model_slope:.2f} bytes per "
                f"parameter** to the model built, {engine_slope:.2f} through initialize"
            )
    return "\n".join(lines)


def slope(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (bytes per parameter, fixed bytes) of peak RSS against parameters."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    per_param = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return per_param, mean_y - per_param * mean_x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="nvme_path for both swap files")
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    parser.add_argument("--setups", nargs="+", default=["stage3-nvme", "stage1-nvme"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (peak RSS: the whole job's)")
    parser.add_argument("--build", action="store_true", help="measure the build alone, eager and under zero_init")
    parser.add_argument("--build-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_worker:
        preset, config_path, deferred = args.build_worker
        build_worker(preset, config_path, deferred == "1")
        return
    load_before = os.getloadavg()
    if args.build:
        header = [f"- machine: {machine_description(args.path)}", f"- command: `{command_line()}`", ""]
        text = "\n".join(header) + "\n" + build_table(args.sizes, args.path, args.timeout)
        print(text)
        if not args.no_write:
            print("written to", write_section("Stage 3 with everything on NVMe: peak RSS of the build", text))
        return
    lines = [
        "| setup | model | parameters | peak RSS | bytes/param | step times (s) | losses |",
        "|---|---|---|---|---|---|---|",
    ]
    fits = []
    for setup in args.setups:
        points = []
        for preset in args.sizes:
            count = num_params(preset)
            result = run(setup, preset, args.path, args.steps, args.timeout, args.nproc)
            print(setup, preset, result, flush=True)
            if "error" in result:
                lines.append(f"| {setup} | {preset} | {count / 1e9:.2f}B | failed: {result['error'][-200:]!r} | | | |")
                continue
            points.append((count, result["peak_rss_bytes"]))
            lines.append(
                f"| {setup} | {preset} | {count / 1e9:.2f}B | {result['peak_rss_bytes'] / 2**30:.2f} GiB | "
                f"{result['peak_rss_bytes'] / count:.2f} | {result['step_time_s']} | {result['losses']} |"
            )
        if len(points) >= 2:
            per_param, fixed = slope(points)
            fits.append(
                f"- {setup}: peak RSS grows by **{per_param:.2f} bytes per parameter**, fixed part {fixed / 2**30:.2f} GiB"
            )
    header = [
        f"- machine: {machine_description(args.path)}",
        f"- command: `{command_line()}`",
        f"- load average before: {', '.join(f'{x:.1f}' for x in load_before)}",
        f"- ranks: {args.nproc} (peak RSS: the launcher and every rank together)",
        "",
    ]
    text = "\n".join(header + lines + [""] + fits)
    print(text)
    if not args.no_write:
        print("written to", write_section("Stage 3 with everything on NVMe: peak RSS against model size", text))


if __name__ == "__main__":
    main()
