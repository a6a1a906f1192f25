"""`memfit bench io`: write then read a file with each I/O backend, check every byte, and run the
same job in fio beside them, so that one run shows memfit's GiB/s, fio's, and their ratio.
Sizes and rates are printed in memfit.units' binary convention.

Fairness: one file serves every engine. It is preallocated and written in full before anything is
timed, so no pass meets unwritten extents (ext4 reads them as zeros without touching the disk, and
converts them on a first write) and no pass allocates blocks. Each repetition runs every engine in
turn, write then read, and the table gives medians over the repetitions, so a load spike from
other processes hits one repetition of one engine, not a whole column. memfit's buffers are new in
every repetition, as fio's are in every pass, and touched before any timing (a first-touch page
fault is not I/O), in one thread and in address order as fio fills its own: the order of first
touches decides how contiguous the pages are in physical memory.

The device columns count the requests the block device completed during each pass (from
/sys/dev/block): the same bytes in more, smaller requests usually mean the buffer's pages were
scattered in physical memory (a virtio disk with 254 segments per request splits every 1 MiB
transfer into 4 KiB pages in two), which changes throughput without any change in the engine.
"""

import os
import statistics
import time
import uuid

import torch
from tqdm import tqdm

from memfit.io import AsyncFile, HostArena, available_backends, backend, register_buffer
from memfit.io.engine import check_geometry
from memfit.launcher.bench_fio import check_fio_engines, fio_command, fio_version, run_fio
from memfit.units import GiB, format_bytes, parse_size

CHUNK_BYTES = 64 << 20  # one request; the engine splits it into block_size pieces
WINDOW_BYTES = 1 << 30  # host memory used for data, per direction
TOUCH_BYTES = 2 << 20
OPS = ("write", "read")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--path", required=True, help="directory to put the test file in (created if missing; the file is removed)"
    )
    parser.add_argument("--size", default="1G", help="bytes to write and read (default 1G)")
    parser.add_argument("--block-size", default="1M", help="I/O piece size (default 1M)")
    parser.add_argument("--queue-depth", type=int, default=32, help="pieces in flight (default 32)")
    parser.add_argument("--backend", default="all", help="io_uring, threads, python, or all available (default all)")
    parser.add_argument(
        "--reps",
        type=int,
        default=3,
        help="repetitions, engines alternating within each; medians are shown (default 3)",
    )
    parser.add_argument(
        "--register",
        action="store_true",
        help="register memfit's buffers with io_uring (memfit.io.register_buffer): fixed reads and writes",
    )
    parser.add_argument("--no-fio", action="store_true", help="measure memfit only (fio runs when it is on PATH)")
    parser.add_argument(
        "--fio-engine",
        default="io_uring",
        help="fio's ioengine: io_uring, libaio, or both comma-separated (default io_uring)",
    )


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
        fio_engines = check_fio_engines(args.fio_engine)
    except ValueError as error:
        raise SystemExit(f"memfit bench io: {error}") from None
    if size <= 0 or size % 4096:
        raise SystemExit(f"memfit bench io: --size must be a positive multiple of 4096, got {args.size}")
    if args.reps < 1:
        raise SystemExit(f"memfit bench io: --reps must be a positive integer, got {args.reps}")
    version = None if args.no_fio else fio_version()
    if version is None:
        fio_engines = []
    elif size % block_size:
        raise SystemExit(
            f"memfit bench io: --size must be a multiple of --block-size for fio to run the same job, got "
            f"{args.size} and {args.block_size} (or pass --no-fio)"
        )
    window = min(size, WINDOW_BYTES)
    path = os.path.join(args.path, f"memfit-bench-{uuid.uuid4().hex}.bin")
    print(
        f"memfit bench io: {format_bytes(size)} at {args.path}, block {format_bytes(block_size)}, "
        f"queue depth {args.queue_depth}, median of {args.reps} repetition{'s' if args.reps > 1 else ''}"
    )
    if args.no_fio:
        print("fio: skipped (--no-fio)")
    elif version is None:
        print("fio: not found on PATH (apt-get install fio): memfit's figures only")
    else:
        print(f"fio: {version}, ioengine {', '.join(fio_engines)}, same file, sizes and queue depth")
    load_before = os.getloadavg()
    engines = list(backends) + [f"fio {engine}" for engine in fio_engines]
    seconds = {(engine, op): [] for engine in engines for op in OPS}
    device_requests = {(engine, op): [] for engine in engines for op in OPS}
    try:
        for rep in range(args.reps):
            with _FreshBuffers(window, seed=rep, register=args.register) as buffers:
                if rep == 0:
                    direct = _lay_out(path, size, backends[0], block_size, args.queue_depth, buffers.pattern)
                    stat_path = _device_stat_path(path)
                    if "io_uring" in backends:
                        _print_registration(buffers.registrations)
                for engine in engines:
                    for op in OPS:
                        before = _device_requests(stat_path)
                        if engine.startswith("fio "):
                            elapsed = _run_fio_pass(path, engine[4:], op, size, block_size, args.queue_depth, direct)
                        else:
                            elapsed = _memfit_pass(path, engine, op, block_size, args.queue_depth, buffers, size)
                        seconds[(engine, op)].append(elapsed)
                        after = _device_requests(stat_path)
                        if before is not None and after is not None:
                            device_requests[(engine, op)].append(after[OPS.index(op)] - before[OPS.index(op)])
    except ValueError as error:  # fio failed; its own message
        raise SystemExit(f"memfit bench io: {error}") from None
    finally:
        if os.path.exists(path):
            os.unlink(path)
    load_after = os.getloadavg()
    rates = {key: size / statistics.median(values) / GiB for key, values in seconds.items()}
    print(f"{'engine':<13} {'write GiB/s':>11} {'read GiB/s':>11}  O_DIRECT  KiB per device request (write, read)")
    for engine in engines:
        request_sizes = [_request_kib(size, device_requests[(engine, op)]) for op in OPS]
        print(
            f"{engine:<13} {rates[(engine, 'write')]:>11.2f} {rates[(engine, 'read')]:>11.2f}  "
            f"{'yes' if direct else 'no':<8}  {request_sizes[0]}, {request_sizes[1]}"
        )
    if fio_engines:
        print(f"{'memfit / fio':<26} {'write':>6} {'read':>6}")
        for name in backends:
            for engine in fio_engines:
                ratios = [rates[(name, op)] / rates[(f"fio {engine}", op)] for op in OPS]
                print(f"{name + ' / fio ' + engine:<26} {ratios[0]:>5.2f}x {ratios[1]:>5.2f}x")
    print(f"load average (1, 5, 15 min): before {_loads(load_before)}, after {_loads(load_after)}")
    return 0


class _FreshBuffers:
    """The pattern memfit writes and the landing it reads into, in an arena of their own for one
    repetition: fio takes new memory for every pass, and the physical layout of a buffer decides
    how many device requests a transfer becomes, so memfit draws new memory as often. Both are
    touched before any timing. The pattern's 8-byte words are a hash of their position and the
    seed: a read from the wrong offset, or of an earlier repetition's data, fails the byte check."""

    def __init__(self, window: int, *, seed: int, register: bool):
        self._arena = HostArena(2 * window)
        self.pattern, self.landing = self._arena.alloc(window), self._arena.alloc(window)
        # First touch in one thread and in address order, as fio fills its buffers, alternating
        # between the two in TOUCH_BYTES steps: the pages the kernel hands out first are the most
        # scattered, and alternating shares them between the write source and the read landing.
        pattern_bytes, landing_bytes = self.pattern.numpy(), self.landing.numpy()
        for start in range(0, window, TOUCH_BYTES):
            pattern_bytes[start : start + TOUCH_BYTES] = 0
            landing_bytes[start : start + TOUCH_BYTES] = 0
        words = self.pattern.view(torch.int64)  # window is a multiple of 4096
        torch.arange(words.numel(), out=words)
        words.mul_(0x9E3779B1).add_(seed << 60)  # Knuth's multiplicative hash; below 2**63 up to 1 GiB
        self.landing.zero_()
        self.registrations = [register_buffer(self.pattern), register_buffer(self.landing)] if register else []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for registration in self.registrations:
            registration.close()
        self.registrations = []
        del self.pattern, self.landing
        self._arena.close()


def _lay_out(path: str, size: int, name: str, block_size: int, queue_depth: int, pattern) -> bool:
    """Preallocates the file and writes it in full, untimed; returns whether it is O_DIRECT."""
    with AsyncFile(path, "w", size=size, backend=name, block_size=block_size, queue_depth=queue_depth) as f:
        _transfer(f, pattern, size, is_read=False, label="lay out")
        return f.direct


def _memfit_pass(path: str, name: str, op: str, block_size: int, queue_depth: int, buffers, size: int) -> float:
    with AsyncFile(path, "rw", backend=name, block_size=block_size, queue_depth=queue_depth) as f:
        if op == "write":
            return _transfer(f, buffers.pattern, size, is_read=False, label=f"{name} write")
        buffers.landing.zero_()  # a read that moved nothing cannot pass the byte check
        return _transfer(f, buffers.landing, size, is_read=True, label=f"{name} read", pattern=buffers.pattern)


def _run_fio_pass(path, engine, op, size, block_size, queue_depth, direct) -> float:
    command = fio_command(
        path, op=op, engine=engine, size_bytes=size, block_size=block_size, queue_depth=queue_depth, direct=direct
    )
    return run_fio(command, op, size)


def _print_registration(registrations) -> None:
    if not registrations:
        print("io_uring: plain reads and writes (--register for fixed ones into registered buffers)")
    elif all(registration.num_fixed_entries for registration in registrations):
        print("io_uring: buffers registered with the ring: fixed reads and writes")
    else:
        print("io_uring: buffers not registered (refused, see the warning): plain reads and writes")


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


def _device_stat_path(path: str) -> str | None:
    """/sys/dev/block/MAJ:MIN/stat of the block device holding path; None for tmpfs, overlay, NFS."""
    device = os.stat(path).st_dev
    stat_path = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat"
    return stat_path if os.path.exists(stat_path) else None


def _device_requests(stat_path: str | None) -> tuple[int, int] | None:
    """(writes, reads) the device has completed since boot, every process's; None if unknown."""
    if stat_path is None:
        return None
    try:
        with open(stat_path) as f:
            fields = f.read().split()
        return int(fields[4]), int(fields[0])
    except (OSError, IndexError, ValueError):
        return None


def _request_kib(size: int, counts: list[int]) -> str:
    if not counts or sum(counts) <= 0:
        return "n/a"
    return f"{size * len(counts) / sum(counts) / 1024:.0f}"


def _loads(loads) -> str:
    return " ".join(f"{load:.2f}" for load in loads)
