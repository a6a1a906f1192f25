"""Training a model whose state does not fit in RAM: the example decoder's 3b preset (2.7B
parameters; bf16 weights and gradients, fp32 masters and AdamW state: 16 bytes per parameter,
about 1.7x this machine's 24 GiB) with offload_optimizer "nvme", one rank, a few optimizer steps.
Reports peak RSS, step time and the losses, against DeepSpeed ZeRO-3 with its NVMe optimizer
offload on the same model in the same run, under a timeout, its outcome as measured.

    python benchmarks/bigger_than_ram.py --path /nvme/dir            # ~30 min, 33 GB of swap
    python benchmarks/bigger_than_ram.py --path /tmp/x --preset tiny --no-write   # quick check
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import command_line, deepspeed_version, machine_description, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402

BYTES_PER_PARAM = 2 + 2 + 4 + 4 + 4  # bf16 weight and gradient, fp32 master, exp_avg, exp_avg_sq


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def num_params(preset: str) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(PRESETS[preset]).parameters())


def tree_rss_bytes(root_pid: int) -> int:
    """Resident bytes of a process and all its descendants (the launcher and its workers, which
    torchrun starts in sessions of their own)."""
    page = os.sysconf("SC_PAGE_SIZE")
    parent_of, rss_of = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss_of[int(entry)] = int(f.read().split()[1]) * page
            parent_of[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
    total = 0
    for pid, rss in rss_of.items():
        ancestor = pid
        while ancestor not in (root_pid, 0, 1) and ancestor in parent_of:
            ancestor = parent_of[ancestor]
        total += rss if ancestor == root_pid else 0
    return total


def run_child(command: list[str], timeout_s: float, env: dict) -> dict:
    """Runs one training job in a process group of its own, sampling the resident memory of it
    and its descendants, twice a second; returns the exit status, wall time, peak RSS and the job's output."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        peak_rss = 0
        while process.poll() is None:
            peak_rss = max(peak_rss, tree_rss_bytes(process.pid))
            if time.perf_counter() - started > timeout_s:
                os.killpg(process.pid, 9)
                process.wait()
                status = f"killed after {timeout_s:.0f} s (timeout)"
                break
            time.sleep(0.5)
        else:
            status = f"exit {process.returncode}"
        try:
            os.killpg(process.pid, 9)  # strays of a failed run
        except ProcessLookupError:
            pass
        output.seek(0)
        text = output.read()
    return {
        "status": status,
        "ok": process.returncode == 0,
        "wall_s": time.perf_counter() - started,
        "peak_rss_bytes": peak_rss,
        "output": text,
    }


def run_memfit(args, workdir: str) -> dict:
    config = json.load(open(os.path.join(ROOT, "examples", "configs", "nvme.json")))
    config["zero_optimization"]["offload_optimizer"]["nvme_path"] = args.path
    config_path = os.path.join(workdir, "nvme.json")
    json.dump(config, open(config_path, "w"))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    command = [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "1"]
    command += ["examples/train_gpt.py", "--config", config_path, "--preset", args.preset]
    command += ["--max-steps", str(args.steps), "--eval-batches", "1", "--metrics", metrics_path]
    result = run_child(command, args.timeout, dict(os.environ))
    records = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
    tokens = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    tokens *= PRESETS[args.preset].seq_len
    result["losses"] = [r["loss"] for r in records]
    result["step_s"] = [tokens / r["tokens_per_s"] for r in records]
    result["swap_bytes"] = records[-1]["memory"].get("swap_bytes") if records else None
    return result


def run_deepspeed(args, workdir: str) -> dict:
    swap = os.path.join(args.path, "deepspeed-swap")
    os.makedirs(swap, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29612"]
    command += [os.path.join(ROOT, "benchmarks", "bigger_than_ram_deepspeed.py"), "--preset", args.preset]
    command += ["--nvme-path", swap, "--steps", str(args.steps)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = run_child(command, args.deepspeed_timeout, env)
    result["losses"] = [
        json.loads(line[5:])["loss"] for line in result["output"].splitlines() if line.startswith("STEP ")
    ]
    subprocess.run(["rm", "-rf", swap])
    return result


def failure_line(output: str) -> str:
    """The worker's own error, not the launcher's report around it."""
    errors = [line for line in output.splitlines() if "Error" in line and "ChildFailedError" not in line]
    lines = [line for line in output.splitlines() if line.strip()]
    return (errors or lines or ["(no output)"])[-1].strip()


def describe(name: str, result: dict) -> str:
    lines = [
        f"- {name}: {result['status']} after {result['wall_s']:.0f} s; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
    ]
    if result["losses"]:
        lines.append(f"  - losses per step: {', '.join(f'{loss:.4f}' for loss in result['losses'])}")
    if result.get("step_s"):
        lines.append(f"  - step times (s): {', '.join(f'{s:.1f}' for s in result['step_s'])}")
    if not result["ok"]:
        lines.append(f"  - why: `{failure_line(result['output'])[:300]}`")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="directory on the NVMe drive (nvme_path), with ~12 B/param free")
    parser.add_argument("--preset", default="3b", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=5400, help="seconds for the memfit run")
    parser.add_argument("--deepspeed-timeout", type=float, default=1800, help="seconds for the DeepSpeed run")
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    args = parser.parse_args()
    os.makedirs(args.path, exist_ok=True)
    params = num_params(args.preset)
    state_bytes = params * BYTES_PER_PARAM
    with tempfile.TemporaryDirectory() as workdir:
        ours = run_memfit(args, workdir)
        print(describe("memfit", ours), flush=True)
        theirs = None if args.skip_deepspeed else run_deepspeed(args, workdir)
    body = [
        f"- machine: {machine_description(args.path)}",
        f"- command: `{command_line()}`",
        f"- deepspeed: {deepspeed_version()}",
        f"- model: the example's `{args.preset}` preset, {params / 1e9:.2f}B parameters; training state "
        f"{state_bytes / 2**30:.1f} GiB at {BYTES_PER_PARAM} B/param = {state_bytes / ram_bytes():.2f}x RAM "
        f"({ram_bytes() / 2**30:.1f} GiB)",
        f"- memfit: `examples/configs/nvme.json` (ZeRO-1, offload_optimizer nvme), {args.steps} steps",
        describe("memfit", ours),
    ]
    if ours["ok"]:
        body.append(f"  - peak RSS per parameter: {ours['peak_rss_bytes'] / params:.2f} B")
    if theirs is not None:
        body += ["- DeepSpeed: ZeRO-3, offload_optimizer nvme, same model and batch", describe("deepspeed", theirs)]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        print("written to", write_section("Bigger than RAM (bigger_than_ram.py)", text))


if __name__ == "__main__":
    main()
