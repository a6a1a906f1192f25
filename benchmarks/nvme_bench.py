"""The NVMe tier's optimizer phase against its two bounds, and peak RSS of NVMe-tier training.

1. Optimizer phase, on bf16 tensors of --params parameters: the streamed step (read k+1, fused
   kernel on k, write k-1) against max(I/O time of its bytes at the bandwidth `memfit bench io`
   measures on the same directory, the host tier's kernel time on the same tensors); target
   <= 1.2x. Beside it the unpipelined step: read all, update, write all.
2. Peak RSS of training with offload_optimizer "nvme" (the example decoder, bf16, AdamW) at two
   sizes, in bytes per parameter (and from one to the other: the marginal cost); target <= 6 plus
   a fixed overhead. Measured with glibc's default malloc and with its mmap threshold pinned (see
   peak_rss).

    python benchmarks/nvme_bench.py --path /nvme/dir                       # ~100M / 2 sizes
    python benchmarks/nvme_bench.py --path /tmp/x --quick --no-write       # quick check
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from common import command_line, machine_description, median, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from memfit.config import load_config  # noqa: E402
from memfit.io import AsyncFile, HostArena  # noqa: E402
from memfit.launcher.bench_io import _transfer  # noqa: E402
from memfit.offload.nvme_kernel import NvmeKernelUpdate, StreamedAdamW  # noqa: E402
from memfit.offload.swap_space import SwapSpace, open_swap  # noqa: E402
from memfit.optim.cpu_adam import CPUAdamW  # noqa: E402

RSS_SCRIPT = """
import json, os, sys, torch, memfit
sys.path.insert(0, os.path.join(sys.argv[1], "examples"))
from gpt_model import GPT, GPTConfig
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of the model at start
model = GPT(GPTConfig(dim=int(sys.argv[2]), n_layers=int(sys.argv[3]), n_heads=8, seq_len=64))
torch.set_default_dtype(torch.float32)
config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
          "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": sys.argv[4]}}}
engine = memfit.initialize(model, config)
for _ in range(2):
    tokens = torch.randint(0, 256, (1, 65))
    logits = engine(tokens[:, :-1])
    engine.backward(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()))
    engine.step()
params = sum(p.numel() for p in model.parameters())
print("RESULT " + json.dumps({"params": params, "peak_rss_bytes": engine.memory_report()["peak_rss_bytes"]}))
"""


def make_tensors(num_params: int, num_tensors: int):
    generator = torch.Generator().manual_seed(0)
    numel = num_params // num_tensors
    params = [torch.randn(numel, generator=generator).bfloat16() for _ in range(num_tensors)]
    for param in params:
        param.grad = torch.randn(numel, generator=generator).bfloat16()
    return params


def io_seconds(path: str, num_bytes: int) -> tuple[float, float]:
    """(write, read) seconds for num_bytes, measured as `memfit bench io` measures them."""
    window = min(num_bytes, 256 << 20)
    arena = HostArena(window)
    buffer = arena.alloc(window)
    buffer.copy_(torch.randint(0, 256, (window,), dtype=torch.uint8))
    file_path = os.path.join(path, "memfit-nvme-bench.bin")
    try:
        with AsyncFile(file_path, "w", size=num_bytes) as file:
            write_s = _transfer(file, buffer, num_bytes, is_read=False, label="write")
            read_s = _transfer(file, buffer, num_bytes, is_read=True, label="read", pattern=buffer.clone())
    finally:
        os.unlink(file_path)
    return write_s, read_s


def optimizer_phase(args) -> dict:
    params = make_tensors(args.params, args.tensors)
    named = [(f"t{i}", p) for i, p in enumerate(params)]
    host = CPUAdamW(params, lr=1e-3)
    host.step()  # creates the state
    started = time.perf_counter()
    host.step()
    host_s = time.perf_counter() - started
    offload = load_config(
        {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"offload_optimizer": {
            "device": "nvme", "nvme_path": args.path, "buffer_size": args.buffer_size, "buffer_count": 4}}}
    ).zero_optimization.offload_optimizer  # fmt: skip
    results = {}
    for label, pipelined in (("pipelined", True), ("unpipelined", False)):
        streamed = StreamedAdamW(params, lr=1e-3)
        swap = open_swap(args.path, 0, 3 * 4 * args.params + (64 << 20), block_size=1 << 20, queue_depth=32)
        update = NvmeKernelUpdate(streamed, named, SwapSpace(swap), offload)
        update.run(1.0)  # the first step writes the state
        if pipelined:
            started = time.perf_counter()
            update.run(1.0)
            results[label] = time.perf_counter() - started
        else:  # read all, update, write all: the whole state in RAM at once
            state = {kind: [torch.empty(p.numel()) for p in params] for kind in ("master", "exp_avg", "exp_avg_sq")}
            started = time.perf_counter()
            reads = [update.space.read(f"t{i}/{kind}", state[kind][i]) for kind in state for i in range(len(params))]
            for request in reads:
                request.wait()
            rows = [
                (state["master"][i], p.grad, state["exp_avg"][i], state["exp_avg_sq"][i], p)
                for i, p in enumerate(params)
            ]
            from memfit.optim.fused_adam import adam_constants, step_tensors

            step_tensors(rows, adam_constants(step=2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                              adamw_mode=True, bias_correction=True, grad_scale=1.0))  # fmt: skip
            writes = [update.space.write(f"t{i}/{kind}", state[kind][i]) for kind in state for i in range(len(params))]
            for request in writes:
                request.wait()
            results[label] = time.perf_counter() - started
        swap.close()
    write_s, read_s = io_seconds(args.path, 12 * args.params)
    results.update(host_s=host_s, io_s=write_s + read_s)
    return results


def peak_rss(path: str, dim: int, layers: int, fixed_mmap_threshold: bool) -> dict:
    """fixed_mmap_threshold: glibc's mmap threshold pinned at 128 KiB. By default glibc raises it
    after a large block is freed, and large temporaries freed later can stay in the heap as RSS
    that is not in use; the two runs show whether the step leaves any."""
    command = [sys.executable, "-c", RSS_SCRIPT, ROOT, str(dim), str(layers), path]
    env = {**os.environ, "PYTHONPATH": ROOT}
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"nvme_bench: training at dim {dim} failed: {result.stderr[-1000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="directory on the drive to measure (nvme_path)")
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--tensors", type=int, default=50)
    parser.add_argument("--buffer-size", type=int, default=64 << 20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1024x8,1536x16", help="dim x layers of the two decoders for peak RSS")
    parser.add_argument("--quick", action="store_true", help="4M parameters, tiny decoders")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.quick:
        args.params, args.tensors, args.buffer_size, args.rounds, args.sizes = 4_000_000, 8, 4 << 20, 1, "128x2,256x2"
    os.makedirs(args.path, exist_ok=True)
    runs = [optimizer_phase(args) for _ in range(args.rounds)]
    phase = {key: median([run[key] for run in runs]) for key in runs[0]}
    bound = max(phase["io_s"], phase["host_s"])
    rss_rows, measured = [], {}
    for fixed in (False, True):
        threshold = "128 KiB" if fixed else "glibc default"
        for size in args.sizes.split(","):
            dim, layers = (int(part) for part in size.split("x"))
            result = measured[(fixed, size)] = peak_rss(args.path, dim, layers, fixed)
            rss_rows.append(
                f"| {threshold} | {result['params'] / 1e6:.1f}M | {result['peak_rss_bytes'] / 2**30:.2f} | "
                f"{result['peak_rss_bytes'] / result['params']:.1f} |"
            )
        small, large = (measured[(fixed, size)] for size in args.sizes.split(","))
        marginal = (large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (large["params"] - small["params"])
        rss_rows.append(f"| {threshold} | from the smaller to the larger | | {marginal:.1f} |")
    body = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_description(args.path),
            "",
            f"Optimizer phase on {args.params / 1e6:.0f}M bf16 parameters in {args.tensors} tensors, ring buffers of "
            f"{args.buffer_size >> 20} MiB x 4, median of {args.rounds} round(s):",
            "",
            "| streamed step (s) | unpipelined step (s) | I/O at bench-io bandwidth (s) | host-tier kernel (s) | "
            "streamed / max(I/O, kernel) |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {phase['pipelined']:.3f} | {phase['unpipelined']:.3f} | {phase['io_s']:.3f} | {phase['host_s']:.3f} | "
            f"{phase['pipelined'] / bound:.2f}x (target <= 1.2x) |",
            "",
            "Peak RSS of NVMe-tier training (bf16, AdamW, ZeRO-1, one rank, 2 steps):",
            "",
            "| malloc mmap threshold | parameters | peak RSS (GiB) | bytes per parameter |",
            "| --- | ---: | ---: | ---: |",
            *rss_rows,
        ]
    )
    print(body)
    if not args.no_write:
        print("written to", write_section("NVMe tier of optimizer offload (benchmarks/nvme_bench.py)", body))


if __name__ == "__main__":
    main()
