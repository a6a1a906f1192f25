"""In-memory snapshots against torch.distributed.checkpoint.async_save, 2 gloo ranks, the same
state on both sides (a stack of bias-free Linear layers sized so each rank owns about --state-mb of
fp32 masters and AdamW moments under ZeRO-2).

Measured in one job, interleaved (A B A B ...), medians over --reps:
  - training stall per snapshot: memfit = the eager part at the snapshot step plus any wait at the
    next optimizer step for the lazy copy; DCP = the time async_save takes to return (plus any wait
    for the previous save, one in flight at most), to a disk directory and to /dev/shm;
  - step time with snapshots every 1 and every 10 steps, against none;
  - restore time from the shared-memory slots against engine.load_checkpoint from disk (the format
    persisted snapshots use).
With --parity xor the two ranks play two nodes (one rank each, a shared-memory directory each),
and the script measures instead, interleaved the same way:
  - the parity round: its time, the CPU time of the rank's process during it (all threads) and
    the bytes each rank sends, against the snapshot's size;
  - step time with snapshots every 10 and every 50 steps without parity, and every 10 and every
    50 steps with parity every snapshot (parity_every 1), against none, over PARITY_STEPS steps or
    --steps; the rounds at snapshot.parity_nice (its default, or --parity-nice);
  - rebuilding a lost node's slot from the other node's data and parity (then restoring from
    memory) against engine.load_checkpoint of the same state from disk.
On a shared machine whose load drifts, --paired N replaces the long runs per row with N turns of one
10-step window per row, the order rotating, and takes the median over turns of each window's time
over the same turn's window without snapshots (--compare-nice-0 adds parity at parity_nice 0).

    python benchmarks/snapshot_bench.py                 # 512 MB of state per rank
    python benchmarks/snapshot_bench.py --parity xor    # parity across two simulated nodes
    python benchmarks/snapshot_bench.py --parity xor --state-mb 128 --paired 20 --compare-nice-0
    python benchmarks/snapshot_bench.py --quick         # a small check that the script runs
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES_PER_OWNED_PARAM = 12  # fp32 master + AdamW's two fp32 moments
PARITY_MODES = {
    "none": (0, False),
    "every 10": (10, False),
    "every 10 + parity": (10, True),
    "every 50": (50, False),
    "every 50 + parity": (50, True),
}
PARITY_STEPS = 100  # two snapshots at the longest interval
PER_STEP = ("step_s", "cpu_s", "wait_s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=float, default=512, help="snapshot state per rank, MB (default 512)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="steps per step-time measurement (default 20)")
    parser.add_argument("--disk-dir", default=None, help="directory on the disk under test (default: a temp dir)")
    parser.add_argument("--parity", choices=["none", "xor"], default="none", help="measure XOR parity (two nodes)")
    parser.add_argument(
        "--parity-nice", type=int, default=None, help="snapshot.parity_nice for the rounds (default: the config's)"
    )
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        help="with --parity xor: instead of the long runs per row, N turns of one 10-step window per row "
        "(none, every 10, every 10 + parity), each window opening with its snapshot; overhead = median over "
        "turns of the window's step time over the same turn's 'none' window",
    )
    parser.add_argument(
        "--compare-nice-0",
        action="store_true",
        help="also the parity rows at parity_nice 0, interleaved (resets the nice value of the parity group's "
        "gloo threads between rows: needs root or CAP_SYS_NICE)",
    )
    parser.add_argument("--quick", action="store_true", help="16 MB, 2 reps, 10 steps; no results file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.state_mb, args.reps, args.steps = 16, 2, 10
    return args


# ---- the worker (one per rank, under torchrun) --------------------------------------------------
def build_engine(args, shm_dir, parity="none"):
    import torch

    import memfit

    width = 1024
    total_params = int(args.state_mb * 1e6 / BYTES_PER_OWNED_PARAM) * 2  # two ranks, each owns half
    num_layers = max(2, round(total_params / (width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(num_layers)])
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 2},
        "snapshot": {"interval_steps": 1, "shm_dir": shm_dir, "parity": parity},
    }
    if args.parity_nice is not None:
        config["snapshot"]["parity_nice"] = args.parity_nice
    return memfit.initialize(model, config), width


def train_step(engine, width):
    import torch

    inputs = torch.randn(4, width)
    engine.backward(engine(inputs).square().mean())
    engine.step()


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def worker(args) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from memfit.checkpointing.integrity import walk_tensors
    from memfit.checkpointing.restore import restore_from_memory
    from memfit.checkpointing.state import export_rank_state

    rank = int(os.environ["RANK"])
    shm_dir = os.path.join("/dev/shm", f"memfit-bench-{os.environ['TORCHELASTIC_RUN_ID']}")
    if args.parity == "xor":
        parity_worker(args, rank, shm_dir)
        return
    engine, width = build_engine(args, shm_dir)
    snapshotter = engine.snapshotter
    eager = []
    after_step = snapshotter.after_step

    def timed_after_step(engine_):
        eager.append(timed(lambda: after_step(engine_)))

    snapshotter.after_step = timed_after_step
    for _ in range(3):  # warm-up: optimizer state exists, slots are mapped
        train_step(engine, width)
    snapshotter.wait_for_copy()

    state = {f"rank{rank}/{path}": tensor for path, tensor in walk_tensors(export_rank_state(engine, {}))}
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    disk_root = args.disk_dir or tempfile.gettempdir()
    dcp_dirs = {"disk": os.path.join(disk_root, "snapshot-bench-dcp"), "shm": "/dev/shm/snapshot-bench-dcp"}

    # DCP's background save runs collectives: on a group of its own, or they interleave with training's
    dcp_group = dist.new_group(backend="gloo")
    stalls = {"memfit": [], "dcp-disk": [], "dcp-shm": []}
    for rep in range(args.reps):
        # memfit: a snapshot at this step, its copy behind the next step's forward and backward
        snapshotter.interval_steps = 1
        before_wait = snapshotter.stall_s
        eager.clear()
        train_step(engine, width)
        snapshotter.interval_steps = 0
        train_step(engine, width)
        stalls["memfit"].append(eager[0] + snapshotter.stall_s - before_wait)
        for where in ("disk", "shm"):
            train_step(engine, width)
            state = {f"rank{rank}/{path}": t for path, t in walk_tensors(export_rank_state(engine, {}))}
            path = os.path.join(dcp_dirs[where], f"rep{rep}")
            started = time.perf_counter()
            future = dcp.async_save(state, checkpoint_id=path, process_group=dcp_group)
            stall = time.perf_counter() - started
            train_step(engine, width)
            started = time.perf_counter()
            future.result()  # one save in flight at most, as the DCP tutorial asks: counted as stall
            stalls[f"dcp-{where}"].append(stall + time.perf_counter() - started)

    step_times = {0: [], 1: [], 10: []}
    for _ in range(args.reps):
        for interval in (0, 1, 10):
            snapshotter.wait_for_copy()
            snapshotter.interval_steps = interval
            dist.barrier()
            step_times[interval].append(timed(lambda: [train_step(engine, width) for _ in range(args.steps)]))
    snapshotter.interval_steps = 0
    snapshotter.wait_for_copy()

    checkpoint_dir = os.path.join(disk_root, "snapshot-bench-ckpt")
    engine.save_checkpoint(checkpoint_dir)
    restores = {"shm": [], "disk": []}
    restore_cpu = {"shm": [], "disk": []}  # CPU seconds of this rank's process: what the load does not stretch
    for _ in range(args.reps):
        for key, restore in (
            ("shm", lambda: restore_from_memory(engine, shm_dir)),
            ("disk", lambda: engine.load_checkpoint(checkpoint_dir)),
        ):
            dist.barrier()
            cpu_before = time.process_time()
            restores[key].append(timed(restore))
            restore_cpu[key].append(time.process_time() - cpu_before)

    result = {
        "state_bytes": state_bytes,
        "stall_s": {key: statistics.median(values) for key, values in stalls.items()},
        "step_s": {key: statistics.median(values) / args.steps for key, values in step_times.items()},
        "restore_s": {key: statistics.median(values) for key, values in restores.items()},
        "restore_cpu_s": {key: statistics.median(values) for key, values in restore_cpu.items()},
    }
    gathered = [None] * engine.world_size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        for directory in list(dcp_dirs.values()) + [checkpoint_dir]:
            shutil.rmtree(directory, ignore_errors=True)
        print("RESULT " + json.dumps(gathered), flush=True)


def _threads_at_nice(nice: int) -> list[int]:
    """Ids of this process's threads, other than the calling one, whose nice value is nice."""
    found = []
    for thread_id in map(int, os.listdir("/proc/self/task")):
        if thread_id != threading.get_native_id() and os.getpriority(os.PRIO_PROCESS, thread_id) == nice:
            found.append(thread_id)
    return found


PAIRED_INTERVAL = 10


def paired_windows(args, engine, width, snapshotter, rounds) -> dict:
    """{"wall": {row: [per-step seconds per turn]}, "cpu": ...}: args.paired turns of one window of
    PAIRED_INTERVAL steps per row, in an order that rotates each turn; a window opens with its snapshot
    step and closes once its copy and parity round are done (a round that outlasts the window counts)."""
    import torch.distributed as dist

    default_nice = getattr(snapshotter, "parity_nice", None)  # None: a build without parity_nice
    rows = {
        "none": (0, False, default_nice),
        "every 10": (PAIRED_INTERVAL, False, default_nice),
        "every 10 + parity": (PAIRED_INTERVAL, True, default_nice),
    }
    gloo_threads = []
    if args.compare_nice_0:
        gloo_threads = _threads_at_nice(default_nice)
        assert default_nice and gloo_threads, "--compare-nice-0: no thread runs at snapshot.parity_nice"
        rows["every 10 + parity (parity_nice 0)"] = (PAIRED_INTERVAL, True, 0)
    snapshotter.interval_steps = 0
    while engine.global_step % PAIRED_INTERVAL != PAIRED_INTERVAL - 1:  # the next step is a snapshot step
        train_step(engine, width)
    names = list(rows)
    wall, cpu = ({name: [] for name in names} for _ in range(2))
    for turn in range(args.paired):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            interval, with_parity, nice = rows[name]
            snapshotter.interval_steps = interval
            snapshotter.parity = rounds if with_parity else None
            if nice is not None:
                snapshotter.parity_nice = nice
                for thread_id in gloo_threads:
                    os.setpriority(os.PRIO_PROCESS, thread_id, nice)
            dist.barrier()
            cpu_before, started = time.process_time(), time.perf_counter()
            for _ in range(PAIRED_INTERVAL):
                train_step(engine, width)
            snapshotter.wait_for_copy()
            if snapshotter._parity_thread is not None:
                snapshotter._parity_thread.join()
            wall[name].append((time.perf_counter() - started) / PAIRED_INTERVAL)
            cpu[name].append((time.process_time() - cpu_before) / PAIRED_INTERVAL)
    snapshotter.parity_nice = default_nice
    for thread_id in gloo_threads:
        os.setpriority(os.PRIO_PROCESS, thread_id, default_nice)
    return {"wall": wall, "cpu": cpu}


def paired_report(results: list[dict], turns: int) -> list[str]:
    """Per row: median per-step time, and the median over turns of its ratio to the same turn's
    'none' window, minus 1 (the slowest rank's)."""
    lines = [
        f"Overhead in turns: {turns} turns of one {PAIRED_INTERVAL}-step window per row, the order rotating, "
        "each window opening with its snapshot and closing once its copy and parity round are done; overhead = "
        "median over turns of the window's time over the same turn's 'none' window, minus 1; slowest rank. "
        f"At interval 50 a snapshot costs the same, spread over 5x the steps: about 1/5 of the interval-10 figure.",
        "",
        "| snapshots | step time (s) | overhead | CPU time (s) | CPU overhead |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in results[0]["paired"]["wall"]:
        row = []
        for kind in ("wall", "cpu"):
            per_rank = [result["paired"][kind] for result in results]
            median_s = max(statistics.median(times[name]) for times in per_rank)
            ratios = [
                statistics.median(t / n - 1 for t, n in zip(times[name], times["none"], strict=True))
                for times in per_rank
            ]
            row.append(f"{median_s:.4f} | {max(ratios):+.1%}")
        lines.append(f"| {name} | {row[0]} | {row[1]} |")
    return lines


def parity_worker(args, rank: int, shm_dir: str) -> None:
    """Each rank is a node of its own, with its own agent and shared-memory directory."""
    import torch.distributed as dist

    from memfit.checkpointing.parity import committed_parity
    from memfit.checkpointing.parity_exchange import rebuild_member
    from memfit.checkpointing.restore import restore_from_memory
    from memfit.checkpointing.slots import newest_committed

    os.environ["LOCAL_WORLD_SIZE"], os.environ["GROUP_RANK"] = "1", str(rank)
    shm_dir = f"{shm_dir}-node{rank}"
    engine, width = build_engine(args, shm_dir, parity="xor")
    snapshotter = engine.snapshotter
    rounds, groups = snapshotter.parity, snapshotter.parity_groups
    for _ in range(3):  # warm-up: optimizer state exists, slots and parity slots are mapped
        train_step(engine, width)
    snapshotter.interval_steps = 0
    snapshotter.close()  # joins the copy and the parity round in flight
    newest = newest_committed(shm_dir, rank)[0]
    data = newest.data()
    round_s, round_cpu_s = [], []
    for _ in range(args.reps):
        dist.barrier()
        cpu_before = time.process_time()
        round_s.append(timed(lambda: rounds.run(data, newest.step)))
        round_cpu_s.append(time.process_time() - cpu_before)

    paired = paired_windows(args, engine, width, snapshotter, rounds) if args.paired else None
    step_times, cpu_times, waits = {}, {}, {}
    if not args.paired:
        num_steps = max(args.steps, PARITY_STEPS)
        default_nice = snapshotter.parity_nice
        modes = {mode: (interval, with_parity, default_nice) for mode, (interval, with_parity) in PARITY_MODES.items()}
        # after close(), the parity group's gloo threads are the only ones at parity_nice
        gloo_threads = _threads_at_nice(default_nice) if args.compare_nice_0 else []
        if args.compare_nice_0:
            assert default_nice > 0 and gloo_threads, "--compare-nice-0: no thread runs at snapshot.parity_nice"
            for mode, (interval, with_parity) in PARITY_MODES.items():
                if with_parity:
                    modes[f"{mode} (parity_nice 0)"] = (interval, True, 0)
        step_times, cpu_times, waits = ({mode: [] for mode in modes} for _ in range(3))
        for _ in range(args.reps):
            for mode, (interval, with_parity, nice) in modes.items():
                snapshotter.wait_for_copy()
                snapshotter.close()
                snapshotter.interval_steps = interval
                snapshotter.parity = rounds if with_parity else None
                snapshotter.parity_nice = nice
                for thread_id in gloo_threads:
                    os.setpriority(os.PRIO_PROCESS, thread_id, nice)
                dist.barrier()
                cpu_before, waited_before = time.process_time(), snapshotter.stall_s
                step_times[mode].append(
                    timed(lambda: [train_step(engine, width) for _ in range(num_steps)]) / num_steps
                )
                cpu_times[mode].append((time.process_time() - cpu_before) / num_steps)
                waits[mode].append((snapshotter.stall_s - waited_before) / num_steps)
    snapshotter.interval_steps = 0
    snapshotter.wait_for_copy()
    snapshotter.close()
    snapshotter.parity = rounds

    # rank 1's node is lost: its slot of the newest round is rebuilt on it from rank 0's data and parity
    newest_round = max(rounds.newest_step, 0)
    reader = next(r for r in newest_committed(shm_dir, rank) if r.step == newest_round)
    parity = next(p for p in committed_parity(shm_dir, rank) if p.step == newest_round)
    metadata = (parity.metadata["part_bytes"], parity.metadata["data_bytes"], parity.metadata["data_digests"])
    reports = [{"local": [newest_round], "parity": {newest_round: metadata}}] * 2
    local = {} if rank == 1 else {"data": reader.data(), "parity": parity.parity}
    checkpoint_dir = os.path.join(args.disk_dir or tempfile.gettempdir(), "snapshot-bench-ckpt")
    engine.save_checkpoint(checkpoint_dir)
    restores = {"rebuild": [], "rebuild+restore": [], "disk": []}
    for _ in range(args.reps):
        dist.barrier()
        rebuild_s = timed(lambda: rebuild_member(groups, {1: 0}, reports, newest_round, local))
        restores["rebuild"].append(rebuild_s)
        dist.barrier()
        restores["rebuild+restore"].append(rebuild_s + timed(lambda: restore_from_memory(engine, shm_dir)))
        dist.barrier()
        restores["disk"].append(timed(lambda: engine.load_checkpoint(checkpoint_dir)))
    result = {
        "snapshot_bytes": data.numel(),
        "sent_bytes": rounds.last_sent_bytes,
        "round_s": statistics.median(round_s),
        "round_cpu_s": statistics.median(round_cpu_s),
        "step_s": {key: statistics.median(values) for key, values in step_times.items()},
        "cpu_s": {key: statistics.median(values) for key, values in cpu_times.items()},
        "wait_s": {key: statistics.median(values) for key, values in waits.items()},
        "restore_s": {key: statistics.median(values) for key, values in restores.items()},
        "paired": paired,
    }
    gathered = [None] * engine.world_size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        print("RESULT " + json.dumps(gathered), flush=True)


# ---- the driver ---------------------------------------------------------------------------------
def slowest(results: list[dict], group: str, key: str) -> float:
    """The slowest rank's median: a stall on any rank stalls the job."""
    return max(result[group][key] for result in results)


def report(args, results: list[dict]) -> str:
    stall = {key: slowest(results, "stall_s", key) for key in results[0]["stall_s"]}
    step = {key: slowest(results, "step_s", key) for key in results[0]["step_s"]}
    restore = {key: slowest(results, "restore_s", key) for key in results[0]["restore_s"]}
    mb = results[0]["state_bytes"] / 1e6
    lines = [
        f"State per rank: {mb:.0f} MB (fp32 masters and AdamW moments of the owned tensors), 2 gloo ranks; "
        f"medians of {args.reps} interleaved repetitions, slowest rank.",
        "",
        "| training stall per snapshot | seconds | memfit / this |",
        "| --- | --- | --- |",
    ]
    for key in ("memfit", "dcp-disk", "dcp-shm"):
        lines.append(f"| {key} | {stall[key]:.4f} | {stall['memfit'] / stall[key]:.3f} |")
    lines += ["", "| snapshots | step time (s) | overhead |", "| --- | --- | --- |"]
    for interval in ("0", "1", "10"):
        name = "none" if interval == "0" else f"every {interval} steps"
        lines.append(f"| {name} | {step[interval]:.4f} | {step[interval] / step['0'] - 1:+.1%} |")
    cpu = {key: slowest(results, "restore_cpu_s", key) for key in results[0]["restore_cpu_s"]}
    lines += ["", "| restore | seconds | disk / this | CPU seconds of the rank's process | disk / this |"]
    lines += ["| --- | --- | --- | --- | --- |"]
    lines += [
        f"| from shared memory | {restore['shm']:.4f} | {restore['disk'] / restore['shm']:.2f} | {cpu['shm']:.4f} | "
        f"{cpu['disk'] / cpu['shm']:.2f} |",
        f"| from disk, page-cached (load_checkpoint) | {restore['disk']:.4f} | 1.00 | {cpu['disk']:.4f} | 1.00 |",
    ]
    return "\n".join(lines)


def parity_report(args, results: list[dict]) -> str:
    restore = {key: max(result["restore_s"][key] for result in results) for key in results[0]["restore_s"]}
    lines = [
        "XOR parity across 2 simulated nodes (1 gloo rank each, on one machine); medians of "
        f"{args.reps} interleaved repetitions, slowest rank.",
        "",
        "| rank | snapshot (MB) | parity round (s) | its CPU time (s) | sent per round (MB) | sent / snapshot |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rank, result in enumerate(results):
        lines.append(
            f"| {rank} | {result['snapshot_bytes'] / 1e6:.1f} | {result['round_s']:.4f} | "
            f"{result['round_cpu_s']:.4f} | {result['sent_bytes'] / 1e6:.1f} | "
            f"{result['sent_bytes'] / result['snapshot_bytes']:.2f} |"
        )
    lines += [""] + (paired_report(results, args.paired) if args.paired else per_step_report(results))
    lines += ["", "| after losing a node | seconds | / disk |", "| --- | --- | --- |"]
    for key, name in (
        ("rebuild", "rebuild the lost slot from parity"),
        ("rebuild+restore", "rebuild, then restore from memory"),
        ("disk", "load_checkpoint from disk"),
    ):
        lines.append(f"| {name} | {restore[key]:.4f} | {restore[key] / restore['disk']:.3f} |")
    return "\n".join(lines)


def per_step_report(results: list[dict]) -> list[str]:
    modes = list(results[0]["step_s"])
    step, cpu, wait = ({key: max(r[group][key] for r in results) for key in modes} for group in PER_STEP)
    lines = [
        "Per step: wall time; CPU time of the rank's process (all its threads: what the snapshot copy and "
        "the parity round take from training on a machine without spare cores); time the training "
        "thread waited for a snapshot copy (and through it for a parity round).",
        "",
        "| snapshots | step time (s) | overhead | CPU time (s) | CPU overhead | waited (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in modes:
        lines.append(
            f"| {key} | {step[key]:.4f} | {step[key] / step['none'] - 1:+.1%} | {cpu[key]:.4f} | "
            f"{cpu[key] / cpu['none'] - 1:+.1%} | {wait[key]:.4f} |"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import command_line, machine_description, write_section

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [os.path.abspath(__file__), "--worker", "--state-mb", str(args.state_mb), "--reps", str(args.reps)]
    command += ["--steps", str(args.steps)] + (["--disk-dir", args.disk_dir] if args.disk_dir else [])
    command += ["--parity", args.parity] + (
        ["--parity-nice", str(args.parity_nice)] if args.parity_nice is not None else []
    )
    command += ["--compare-nice-0"] if args.compare_nice_0 else []
    command += ["--paired", str(args.paired)] if args.paired else []
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        print(done.stderr[-4000:], file=sys.stderr)
        return 1
    results = json.loads(line[len("RESULT ") :])
    table = parity_report(args, results) if args.parity == "xor" else report(args, results)
    print(table)
    if not args.quick:
        body = f"`{command_line()}`\n\n{machine_description(args.disk_dir or tempfile.gettempdir())}\n\n{table}"
        title = "Snapshot parity: round, overhead, rebuild vs disk" if args.parity == "xor" else None
        print("results:", write_section(title or "Snapshots: memfit vs DCP async_save", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
