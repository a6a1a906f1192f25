"""File I/O throughput: memfit's backends against fio and DeepSpeed's async I/O op.

Every engine writes, then reads, the same preallocated, fully written file with the same block
size and queue depth, O_DIRECT, one request of --size bytes. Engines alternate within each
repetition; the table gives medians over the repetitions and the ratios the targets are set on.

    python benchmarks/io_bench.py --path /work --size 1G --reps 5
"""

import argparse
import os
import shutil
import subprocess
import time

import torch
from common import command_line, deepspeed_version, machine_description, median, write_section

from memfit.io import AsyncFile, HostArena, available_backends
from memfit.launcher.bench_fio import fio_command, run_fio
from memfit.units import parse_size

FIO_ENGINES = ["io_uring", "libaio", "psync"]


def memfit_runner(backend, path, buffer, block_size, queue_depth):
    def run(op):
        with AsyncFile(path, "rw", backend=backend, block_size=block_size, queue_depth=queue_depth) as f:
            started = time.perf_counter()
            (f.pread(buffer, 0) if op == "read" else f.pwrite(buffer, 0)).wait()
            return time.perf_counter() - started

    return run


def fio_runner(engine, path, size, block_size, queue_depth):
    """The job `memfit bench io` gives fio. fio takes fresh memory in every pass while memfit's
    buffer here is one arena for the whole run, and on a virtio disk the physical layout of a buffer
    decides how many device requests each transfer becomes: `memfit bench io`, which draws fresh
    memory for memfit in every repetition, is the like-for-like comparison."""

    def run(op):
        command = fio_command(
            path, op=op, engine=engine, size_bytes=size, block_size=block_size, queue_depth=queue_depth, direct=True
        )
        return run_fio(command, op, size)

    return run


def deepspeed_runner(path, size, block_size, queue_depth):
    """DeepSpeed's aio_handle per BENCHMARKS.md, on a page-locked buffer so it does not bounce."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    module = AsyncIOBuilder().load(verbose=False)
    handle = module.aio_handle(block_size, queue_depth, False, True, 1)
    buffer = handle.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
    buffer.fill_(3)

    def run(op):
        started = time.perf_counter()
        (handle.sync_pread if op == "read" else handle.sync_pwrite)(buffer, path)
        return time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=".", help="directory on the file system to measure")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--block-sizes", default="1M,8M")
    parser.add_argument("--queue-depth", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-deepspeed", action="store_true")
    args = parser.parse_args()

    size = parse_size(args.size)
    path = os.path.join(os.path.abspath(args.path), "memfit-io-bench.bin")
    arena = HostArena(size)
    buffer = arena.alloc(size)
    buffer.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
    with AsyncFile(path, "w", size=size) as f:  # lay the whole file out: no sparse reads
        f.pwrite(buffer, 0).wait()
        f.fsync()

    notes = []
    rows = []
    try:
        for block_text in args.block_sizes.split(","):
            block_size = parse_size(block_text)
            runners = {}
            for backend in available_backends():
                if backend != "python":
                    runners[f"memfit {backend}"] = memfit_runner(backend, path, buffer, block_size, args.queue_depth)
            if shutil.which("fio"):
                for engine in FIO_ENGINES:
                    runners[f"fio {engine}"] = fio_runner(engine, path, size, block_size, args.queue_depth)
            else:
                notes.append("fio is not installed (apt-get install fio): no fio figures.")
            if not args.no_deepspeed:
                try:
                    runners["deepspeed aio"] = deepspeed_runner(path, size, block_size, args.queue_depth)
                except Exception as error:  # report why the anchor cannot run, never a borrowed figure
                    notes.append(f"DeepSpeed async I/O could not run: {type(error).__name__}: {error}")
            times = {(name, op): [] for name in runners for op in ("write", "read")}
            for run in runners.values():  # warm-up
                run("write"), run("read")
            for _ in range(args.reps):
                for name, run in runners.items():
                    for op in ("write", "read"):
                        times[(name, op)].append(run(op))
            gbps = {key: size / median(values) / (1 << 30) for key, values in times.items()}
            for name in runners:
                rows.append((block_text, name, gbps[(name, "write")], gbps[(name, "read")]))
            print(
                f"block {block_text}: "
                + ", ".join(f"{n} w {gbps[(n, 'write')]:.2f} r {gbps[(n, 'read')]:.2f}" for n in runners)
            )
    finally:
        os.unlink(path)

    table = ["| block | engine | write GiB/s | read GiB/s |", "| --- | --- | ---: | ---: |"]
    table += [f"| {b} | {n} | {w:.2f} | {r:.2f} |" for b, n, w, r in rows]
    ratios = [
        "| block | op | memfit best | fio best | memfit / fio | DeepSpeed | memfit / DeepSpeed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for block_text in args.block_sizes.split(","):
        by_name = {n: (w, r) for b, n, w, r in rows if b == block_text}
        for index, op in enumerate(("write", "read")):
            ours = max(v[index] for n, v in by_name.items() if n.startswith("memfit"))
            fio = max((v[index] for n, v in by_name.items() if n.startswith("fio")), default=float("nan"))
            ds = by_name.get("deepspeed aio", (float("nan"),) * 2)[index]
            ratios.append(
                f"| {block_text} | {op} | {ours:.2f} | {fio:.2f} | {ours / fio:.2f}x | {ds:.2f} | {ours / ds:.2f}x |"
            )
    body = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_description(args.path),
            f"- fio: {subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip() if shutil.which('fio') else 'absent'}",
            f"- deepspeed: {deepspeed_version()}",
            "",
            f"{args.size} file, O_DIRECT, queue depth {args.queue_depth}, median of {args.reps} alternating repetitions "
            "after one warm-up. fio psync keeps one request in flight whatever the queue depth. DeepSpeed: "
            "aio_handle(block, qd, single_submit=False, overlap_events=True, intra_op_parallelism=1) on a locked buffer.",
            "",
            *table,
            "",
            *ratios,
            "",
            *[f"Note: {note}" for note in notes],
        ]
    )
    print(body)
    print("written to", write_section("File I/O (benchmarks/io_bench.py)", body))


if __name__ == "__main__":
    main()
