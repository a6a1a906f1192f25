"""The restart a user sees with in-memory snapshots: a `memfit run` job of examples/train_gpt.py
(2 ranks, ZeRO-2, snapshots every --interval steps), one worker killed with SIGKILL once the job
has logged --kill-after steps, timed from the kill to the first step after the restore (the first
metrics record that carries restored_from: the launcher noticed the loss, restarted both workers,
they restored the snapshot from shared memory and ran one step). Each round is a fresh job.

    python benchmarks/restart_bench.py                 # the small preset, 3 rounds
    python benchmarks/restart_bench.py --quick         # the tiny preset, 1 round; no results file
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt.py")
POLL_S = 0.01


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="train_gpt.py model preset (default small)")
    parser.add_argument("--rounds", type=int, default=3, help="jobs, one kill each (default 3)")
    parser.add_argument("--interval", type=int, default=4, help="snapshot interval_steps (default 4)")
    parser.add_argument("--kill-after", type=int, default=6, help="logged steps before the kill (default 6)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a round may take (default 900)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 1 round; no results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.rounds = "tiny", 1
    return args


def write_config(directory: str, interval: int) -> str:
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "seed": 1234,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.001}},
        "zero_optimization": {"stage": 2},
        "snapshot": {"interval_steps": interval},
    }
    path = os.path.join(directory, "config.json")
    with open(path, "w") as file:
        json.dump(config, file)
    return path


def write_corpus(directory: str) -> str:
    path = os.path.join(directory, "corpus.txt")
    with open(os.path.join(ROOT, "memfit", "runtime", "engine.py"), "rb") as source, open(path, "wb") as corpus:
        corpus.write(source.read() * 20)
    return path


def metrics_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [line for line in file.read().splitlines() if line.strip()]


def rank1_worker(launcher: psutil.Process) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if EXAMPLE in child.cmdline() and child.environ().get("RANK") == "1":
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def wait_until(condition, deadline: float, what: str):
    while (value := condition()) is None or value is False:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(POLL_S)
    return value


def one_round(args, directory: str) -> dict:
    """{"restart_s", "restored_from"} of one job killed once."""
    metrics = os.path.join(directory, f"metrics-{uuid.uuid4().hex[:6]}.jsonl")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["MEMFIT_SNAPSHOT_SHM_DIR"] = f"/dev/shm/memfit-restart-bench-{uuid.uuid4().hex[:8]}"
    max_steps = args.kill_after + 2 * args.interval
    command = [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "2", "--max-restarts", "1"]
    command += [EXAMPLE, "--config", write_config(directory, args.interval), "--preset", args.preset]
    command += ["--data", write_corpus(directory), "--max-steps", str(max_steps), "--eval-every", "100000"]
    command += ["--metrics", metrics, "--model-out", os.path.join(directory, "model.safetensors")]
    with open(os.path.join(directory, "job.log"), "a") as log:
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + args.timeout
        wait_until(lambda: len(metrics_lines(metrics)) >= args.kill_after, deadline, f"{args.kill_after} steps")
        victim = wait_until(lambda: rank1_worker(psutil.Process(job.pid)), deadline, "rank 1's worker")
        killed_at = time.perf_counter()
        victim.send_signal(signal.SIGKILL)
        restored = wait_until(
            lambda: next((json.loads(line) for line in metrics_lines(metrics) if "restored_from" in line), None),
            deadline,
            "the first step after the restore",
        )
        restart_s = time.perf_counter() - killed_at
        if job.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
            raise RuntimeError(f"the job failed after the restart; see {directory}/job.log")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return {"restart_s": restart_s, "restored_from": restored["restored_from"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import command_line, machine_description, write_section

    rounds = []
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as directory:
        for number in range(args.rounds):
            rounds.append(one_round(args, directory))
            print(f"round {number + 1}: {rounds[-1]['restart_s']:.2f} s", flush=True)
    lines = [
        f"examples/train_gpt.py preset {args.preset} under `memfit run`, 2 ranks, ZeRO-2, snapshots every "
        f"{args.interval} steps; rank 1's worker killed (SIGKILL) after {args.kill_after} logged steps, "
        f"restored from step {rounds[0]['restored_from']}; {args.rounds} rounds, a fresh job each.",
        "",
        "| kill -9 to the first step after the restore | seconds |",
        "| --- | --- |",
    ]
    lines += [f"| round {number + 1} | {result['restart_s']:.2f} |" for number, result in enumerate(rounds)]
    lines.append(f"| median | {statistics.median(r['restart_s'] for r in rounds):.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        body = f"`{command_line()}`\n\n{machine_description()}\n\n{table}"
        print("results:", write_section("Snapshots: restart after a killed worker", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
