"""`memfit bench io`: write then read a file with each I/O backend, check every byte, report GiB/s.
Sizes and rates are printed in memfit.units' binary convention."""

import os
import time
import uuid

import torch
from tqdm import tqdm

from memfit.io import AsyncFile, HostArena, available_backends, backend
from memfit.io.engine import check_geometry
from memfit.units import GiB, format_bytes, parse_size

CHUNK_BYTES = 64 << 20  # one request; the engine splits it into block_size pieces
WINDOW_BYTES = 1 << 30  # host memory used for data, per direction


def add_arguments(parser) -> None:
    parser.add_argument(
        "--path", required=True, help="directory to put the test file in (created if missing; the file is removed)"
    )
    parser.add_argument("--size", default="1G", help="bytes to write and read (default 1G)")
    parser.add_argument("--block-size", default="1M", help="I/O piece size (default 1M)")
    parser.add_argument("--queue-depth", type=int, default=32, help="pieces in flight (default 32)")
    parser.add_argument("--backend", default="all", help="io_uring, threads, python, or all available (default all)")


def run(args) -> int:
    try:
        os.makedirs(args.path, exist_ok=True)
    except FileExistsError:
        raise SystemExit(f"memfit bench io: --path {args.path}: not a directory") from None
    except OSError as error:
        raise SystemExit(f"memfit bench io: --path {args.path}: {error.strerror}") from None
    try:
        size = parse_size(args.size, "--size")
        block_size, _ = check_geometry(args.block_size, args.queue_depth)
        backends = available_backends() if args.backend == "all" else [backend(b) for b in args.backend.split(",")]
    except ValueError as error:
        raise SystemExit(f"memfit bench io: {error}") from None
    if size <= 0 or size % 4096:
        raise SystemExit(f"memfit bench io: --size must be a positive multiple of 4096, got {args.size}")
    window = min(size, WINDOW_BYTES)
    arena = HostArena(2 * window)
    pattern, landing = arena.alloc(window), arena.alloc(window)
    pattern.copy_(torch.randint(0, 256, (window,), dtype=torch.uint8))
    path = os.path.join(args.path, f"memfit-bench-{uuid.uuid4().hex}.bin")
    print(
        f"memfit bench io: {format_bytes(size)} at {args.path}, block {format_bytes(block_size)}, "
        f"queue depth {args.queue_depth}"
    )
    results = []
    try:
        for name in backends:
            with AsyncFile(
                path, "w", size=size, backend=name, block_size=block_size, queue_depth=args.queue_depth
            ) as f:
                write_s = _transfer(f, pattern, size, is_read=False, label=f"{name} write")
                read_s = _transfer(f, landing, size, is_read=True, label=f"{name} read", pattern=pattern)
                results.append((name, size / write_s, size / read_s, f.direct))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    print(f"{'backend':<10} {'write GiB/s':>11} {'read GiB/s':>11}  O_DIRECT")
    for name, write_rate, read_rate, direct in results:
        print(f"{name:<10} {write_rate / GiB:>11.2f} {read_rate / GiB:>11.2f}  {'yes' if direct else 'no'}")
    return 0


def _transfer(f: AsyncFile, window: torch.Tensor, size: int, *, is_read: bool, label: str, pattern=None) -> float:
    """Moves size bytes through the window in CHUNK_BYTES requests, all in flight at once within a
    window; returns the seconds spent in I/O (byte checks are not timed)."""
    elapsed = 0.0
    # The bar shows progress only: tqdm's own size units are decimal, memfit prints binary ones.
    with tqdm(total=size, desc=label, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}") as bar:
        for window_start in range(0, size, window.numel()):
            span = min(window.numel(), size - window_start)
            started = time.perf_counter()
            requests = []
            for chunk_start in range(0, span, CHUNK_BYTES):
                chunk = window[chunk_start : chunk_start + min(CHUNK_BYTES, span - chunk_start)]
                offset = window_start + chunk_start
                requests.append((f.pread(chunk, offset) if is_read else f.pwrite(chunk, offset), chunk.numel()))
            for request, num_bytes in requests:
                request.wait()
                bar.update(num_bytes)
            elapsed += time.perf_counter() - started
            if is_read and not torch.equal(window[:span], pattern[:span]):
                raise SystemExit(f"memfit bench io: {label}: bytes read back differ from bytes written")
    return elapsed
