"""CPU Adam step time: memfit CPUAdamW (fused kernel) against DeepSpeedCPUAdam and torch AdamW
(fused, foreach), with a STREAM-style triad as the memory-bandwidth limit.

fp32: 100M parameters (--numel) with gradients set; each implementation's step() is timed, one
step each per round, after a warm-up step that allocates the state. An fp32 step moves 28 bytes
per parameter (reads p, g, m, v; writes p, m, v), so GB/s is reported at 28 B/param. The bound is
a STREAM-style triad done in place, a = a + s * c: 12 B per element, and like Adam's writes its
write goes to a line it has just read, so no write-allocate traffic hides in either figure. One
core's bandwidth grows with the number of streams it reads, so a single-thread Adam step (four
streams) can beat the single-thread triad (two); the all-thread triad is the limit that matters.

bf16: a bf16 parameter with a bf16 gradient and an fp32 master. memfit's CPUAdamW reads the bf16
gradient and writes the bf16 parameter in its one pass; DeepSpeed's equivalent casts the
gradient to fp32, steps the fp32 master, then casts it back to bf16 (three passes).

Each thread count runs in its own subprocess with OMP_NUM_THREADS set, because DeepSpeed's op
links its own OpenMP runtime, which torch.set_num_threads does not reach.

    python benchmarks/adam_bench.py                       # 100M parameters (about 10 GB), 1 and all threads
    python benchmarks/adam_bench.py --numel 2000000 --reps 5 --no-write   # quick check
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from common import command_line, deepspeed_version, machine_description, median, write_section

from memfit.optim import CPUAdamW
from memfit.optim.fused_adam import adam_isa

BYTES_PER_PARAM = 28
TRIAD_BYTES_PER_ELEMENT = 12
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def deepspeed_class():
    """DeepSpeedCPUAdam, or the reason it cannot run here (its op compiles on first use)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        probe = torch.nn.Parameter(torch.zeros(16))
        probe.grad = torch.zeros(16)
        DeepSpeedCPUAdam([probe], **HYPER).step()
        return DeepSpeedCPUAdam, None
    except Exception as error:  # ImportError, a failed JIT build, a missing compiler
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]


def fp32_parameter(numel, grad):
    param = torch.nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(0)))
    param.grad = grad  # one gradient tensor shared by every implementation: it is only read
    return param


class DeepSpeedBf16:
    """DeepSpeed's way to a bf16 parameter: gradient to fp32, step the fp32 master, cast back."""

    def __init__(self, ds_class, param16, grad16):
        self.param16, self.grad16 = param16, grad16
        self.master = torch.nn.Parameter(param16.detach().float())
        self.master.grad = torch.empty_like(self.master)
        self.optimizer = ds_class([self.master], **HYPER)

    def step(self):
        self.master.grad.copy_(self.grad16)
        self.optimizer.step()
        with torch.no_grad():
            self.param16.copy_(self.master)


class Triad:
    """a = a + s * c over float32 arrays in one torch kernel (threaded like the others); s is tiny
    so a stays finite over any number of repetitions."""

    def __init__(self, numel):
        self.a, self.c = torch.rand(numel), torch.rand(numel)

    def step(self):
        self.a.add_(self.c, alpha=1e-9)


def build(numel, ds_class):
    """name -> an object whose step() is timed. About 95 bytes per parameter in all."""
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(1)) * 1e-2
    runs = {
        "triad": Triad(numel),
        "memfit CPUAdamW": CPUAdamW([fp32_parameter(numel, grad)], **HYPER),
        "torch AdamW fused": torch.optim.AdamW([fp32_parameter(numel, grad)], fused=True, **HYPER),
        "torch AdamW foreach": torch.optim.AdamW([fp32_parameter(numel, grad)], foreach=True, **HYPER),
    }
    if ds_class is not None:
        runs["DeepSpeedCPUAdam"] = ds_class([fp32_parameter(numel, grad)], **HYPER)
    grad16 = grad.to(torch.bfloat16)
    param16 = torch.nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    param16.grad = grad16
    runs["memfit CPUAdamW bf16"] = CPUAdamW([param16], **HYPER)
    if ds_class is not None:
        ds_param16 = torch.nn.Parameter(param16.detach().clone())
        runs["DeepSpeedCPUAdam bf16 (cast, step, cast)"] = DeepSpeedBf16(ds_class, ds_param16, grad16)
    return runs


def worker(args) -> None:
    """One thread count: prints {name: [seconds per repetition]} and facts as JSON."""
    torch.set_num_threads(args.threads)
    ds_class, ds_problem = deepspeed_class()
    runs = build(args.numel, ds_class)
    for run in runs.values():  # warm-up: state allocation, first touch, JIT
        run.step()
    times = {name: [] for name in runs}
    for _ in range(args.reps):  # interleaved: one step of each per round
        for name, run in runs.items():
            started = time.perf_counter()
            run.step()
            times[name].append(time.perf_counter() - started)
    print(json.dumps({"times": times, "deepspeed_problem": ds_problem, "isa": adam_isa()}))


def run_worker(args, threads: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads)]
    command += ["--numel", str(args.numel), "--reps", str(args.reps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"worker with {threads} threads failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: dict, numel: int, ds_problem) -> str:
    rows = [
        "| implementation | threads | step (ms, median) | Gparam/s | GB/s at 28 B/param | memfit is x faster | % of triad bandwidth |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for threads, result in results.items():
        medians = {name: median(values) for name, values in result["times"].items()}
        triad_bandwidth = TRIAD_BYTES_PER_ELEMENT * numel / medians["triad"] / 1e9
        rows.append(
            f"| triad a += s c (bandwidth limit) | {threads} | {medians['triad'] * 1e3:.1f} | "
            f"{triad_bandwidth / BYTES_PER_PARAM:.3f} (at 28 B) | {triad_bandwidth:.1f} | | 100% |"
        )
        expected = ["memfit CPUAdamW", "DeepSpeedCPUAdam", "torch AdamW fused", "torch AdamW foreach"]
        expected += ["memfit CPUAdamW bf16", "DeepSpeedCPUAdam bf16 (cast, step, cast)"]
        for name in expected:
            if name not in medians:
                rows.append(f"| {name} | {threads} | not run: {ds_problem} | | | | |")
                continue
            seconds = medians[name]
            memfit_name = "memfit CPUAdamW bf16" if "bf16" in name else "memfit CPUAdamW"
            ratio = "" if name.startswith("memfit") else f"{seconds / medians[memfit_name]:.2f}"
            bandwidth = BYTES_PER_PARAM * numel / seconds / 1e9
            rows.append(
                f"| {name} | {threads} | {seconds * 1e3:.1f} | {numel / seconds / 1e9:.3f} | {bandwidth:.1f} | "
                f"{ratio} | {100 * bandwidth / triad_bandwidth:.0f}% |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000, help="parameters per implementation")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per implementation (at least 5)")
    parser.add_argument("--threads", type=int, default=None, help="one thread count (default: 1 and all cores)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch benchmarks/results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reps < 5 and not args.worker:
        parser.error("--reps: at least 5 repetitions (benchmarks/BENCHMARKS.md)")
    if args.worker:
        worker(args)
        return
    all_threads = len(os.sched_getaffinity(0))
    thread_counts = [args.threads] if args.threads else sorted({1, all_threads})
    results = {threads: run_worker(args, threads) for threads in thread_counts}
    first = next(iter(results.values()))
    body = "\n".join(
        [
            f"`{command_line()}`",
            "",
            machine_description(),
            f"- deepspeed {deepspeed_version()}; memfit kernel level {first['isa']}",
            f"- {args.numel:,} parameters, {args.reps} interleaved repetitions after a warm-up step, medians.",
            "- 'memfit is x faster' is the other implementation's time over memfit's (fp32 rows against memfit"
            " fp32, bf16 rows against memfit bf16). GB/s counts the 28 bytes per parameter a fused step must"
            " move, for every row; the triad row is its own 12 B per element.",
            "",
            table(results, args.numel, first["deepspeed_problem"]),
        ]
    )
    print(body)
    if not args.no_write:
        print("written to", write_section("CPU Adam step (adam_bench.py)", body))


if __name__ == "__main__":
    main()
