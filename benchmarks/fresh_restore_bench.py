"""The restore a restarted job does: 2 gloo ranks (ZeRO-2, about --state-mb of fp32 masters and
AdamW moments per rank, as snapshot_bench.py) train 3 steps with a snapshot every step and exit,
keeping the slots; then fresh processes, --reps times, time the restore inside memfit.initialize
(restore_latest: no optimizer state exists yet, as after a kill). Wall and CPU seconds of each
rank's process, medians, slowest rank.

    python benchmarks/fresh_restore_bench.py
    python benchmarks/fresh_restore_bench.py --state-mb 64 --reps 2
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES_PER_OWNED_PARAM = 12  # fp32 master + AdamW's two fp32 moments
WIDTH = 1024


def worker(phase: str, shm_dir: str, state_mb: float) -> None:
    import torch
    import torch.distributed as dist

    import memfit
    import memfit.runtime.build as build

    num_layers = max(2, round(int(state_mb * 1e6 / BYTES_PER_OWNED_PARAM) * 2 / (WIDTH * WIDTH)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(num_layers)])
    snapshot = {"interval_steps": 1 if phase == "train" else 1000, "shm_dir": shm_dir, "keep_shm": True}
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 2},
        "snapshot": snapshot,
    }
    timing = {}
    restore_latest = build.restore_latest

    def timed_restore(engine, snapshotter):
        dist.barrier()
        cpu_before, started = time.process_time(), time.perf_counter()
        step = restore_latest(engine, snapshotter)
        timing.update(wall_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu_before, step=step)
        return step

    build.restore_latest = timed_restore
    engine = memfit.initialize(model, config)
    num_steps = 3 if phase == "train" else 1  # a restored job's first step
    for _ in range(num_steps):
        engine.backward(engine(torch.randn(4, WIDTH)).square().mean())
        engine.step()
    engine.snapshotter.wait_for_copy()
    gathered = [None] * engine.world_size
    dist.all_gather_object(gathered, timing)
    if dist.get_rank() == 0 and phase == "restore":
        print("RESULT " + json.dumps(gathered), flush=True)
    engine.snapshotter.close()


def run_job(phase: str, shm_dir: str, state_mb: float, job_id: str) -> list | None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "MEMFIT_JOB_ID": job_id}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [os.path.abspath(__file__), "--worker", phase, "--shm-dir", shm_dir, "--state-mb", str(state_mb)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the {phase} job failed:\n{done.stderr[-3000:]}")
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    return json.loads(line[len("RESULT ") :]) if line else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=float, default=512, help="snapshot state per rank, MB (default 512)")
    parser.add_argument("--reps", type=int, default=3, help="restarts timed (default 3)")
    parser.add_argument("--worker", choices=["train", "restore"], help=argparse.SUPPRESS)
    parser.add_argument("--shm-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.shm_dir, args.state_mb)
        return 0
    job_id = f"fresh-restore-bench-{uuid.uuid4().hex[:8]}"
    shm_dir = os.path.join("/dev/shm", job_id)
    try:
        run_job("train", shm_dir, args.state_mb, job_id)
        results = [run_job("restore", shm_dir, args.state_mb, job_id) for _ in range(args.reps)]
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    steps = {rank_timing["step"] for result in results for rank_timing in result}
    wall = statistics.median(max(t["wall_s"] for t in result) for result in results)
    cpu = statistics.median(max(t["cpu_s"] for t in result) for result in results)
    print(f"restore_latest in fresh processes (step {sorted(steps)}), {args.reps} restarts, slowest rank:")
    print(f"| wall seconds | CPU seconds |\n| --- | --- |\n| {wall:.4f} | {cpu:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
