"""One parity round in isolation: its wall time and the CPU time it costs each member, split by
thread (the caller's Python thread: checksums, XORs, posting the sends and receives; gloo's TCP
loop: the kernel's copies of what is sent and received), for --members simulated nodes on this
machine (one gloo rank each, a shared-memory directory and agent each), --state-mb of slot bytes
per member. No training runs beside it: snapshot_bench.py --parity xor measures what a round takes
from training.

    python benchmarks/parity_round_bench.py --members 2 --state-mb 128
    python benchmarks/parity_round_bench.py --members 3 --state-mb 96
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=2, help="simulated nodes, one rank each (default 2)")
    parser.add_argument("--state-mb", type=float, default=128, help="slot bytes per member, MB (default 128)")
    parser.add_argument("--reps", type=int, default=8, help="timed rounds after one warm-up (default 8)")
    parser.add_argument("--chunk-mb", type=float, default=None, help="chunk size, MiB (default: parity_exchange's)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def thread_cpu_s() -> dict[str, tuple[str, float]]:
    """{thread id: (name, CPU seconds)} of this process's live threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    for thread_id in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{thread_id}/stat") as stat, open(f"/proc/self/task/{thread_id}/comm") as comm:
                fields = stat.read().rsplit(")", 1)[1].split()
                threads[thread_id] = (comm.read().strip(), (int(fields[11]) + int(fields[12])) / ticks)
        except OSError:
            continue  # a thread that ended
    return threads


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from memfit.checkpointing import agent
    from memfit.checkpointing.parity_exchange import ParityGroups, ParityRounds
    from memfit.checkpointing.slots import SlotFile, slot_path

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    shm_dir = f"/dev/shm/memfit-parity-round-bench-{os.environ['TORCHELASTIC_RUN_ID']}-node{rank}"
    agent.ensure_agent(shm_dir, os.getpid())
    num_bytes = int(args.state_mb * 1e6)
    agent.request(shm_dir, {"op": "allocate", "rank": rank, "bytes": num_bytes + (1 << 20)})
    slot = SlotFile(slot_path(shm_dir, rank, 0))
    data = slot.bytes[:num_bytes]
    data.copy_(torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank)))
    groups = ParityGroups(args.members, 1, rank)
    options = {"chunk_bytes": int(args.chunk_mb * (1 << 20))} if args.chunk_mb else {}
    rounds = ParityRounds(groups, shm_dir, args.members, **options)
    rounds.run(data, 1)  # warm-up: the parity slots are allocated and mapped
    dist.barrier()
    before, cpu_before = thread_cpu_s(), time.process_time()
    wall_s = []
    for step in range(2, 2 + args.reps):
        round_started = time.perf_counter()
        rounds.run(data, step)
        wall_s.append(time.perf_counter() - round_started)
    cpu_s = (time.process_time() - cpu_before) / args.reps
    by_name: dict[str, float] = {}
    for thread_id, (name, seconds) in thread_cpu_s().items():
        by_name[name] = by_name.get(name, 0.0) + (seconds - before.get(thread_id, (name, 0.0))[1]) / args.reps
    result = {"wall_s": statistics.median(wall_s), "cpu_s": cpu_s, "threads": by_name, "sent": rounds.last_sent_bytes}
    gathered = [None] * args.members
    dist.all_gather_object(gathered, result)
    rounds.close()
    slot.close()
    dist.barrier()
    shutil.rmtree(shm_dir, ignore_errors=True)
    if rank == 0:
        print("RESULT " + json.dumps(gathered), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.members)]
    command += [os.path.abspath(__file__), "--worker", "--members", str(args.members), "--state-mb", str(args.state_mb)]
    command += ["--reps", str(args.reps)] + (["--chunk-mb", str(args.chunk_mb)] if args.chunk_mb else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        print(done.stderr[-4000:], file=sys.stderr)
        return 1
    print(f"{args.members} members, {args.state_mb:g} MB each; per round, median wall and mean CPU of {args.reps}:")
    print("| member | wall (s) | CPU (s) | CPU by thread (s) | sent (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for member, result in enumerate(json.loads(line[len("RESULT ") :])):
        threads = ", ".join(f"{name} {seconds:.3f}" for name, seconds in result["threads"].items() if seconds > 0)
        print(f"| {member} | {result['wall_s']:.3f} | {result['cpu_s']:.3f} | {threads} | {result['sent'] / 1e6:.1f} |")
    print(f"load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
