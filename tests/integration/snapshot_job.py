"""Helpers for the snapshot crash tests: the example trainer under `memfit run` with snapshots on,
a small byte corpus, its metrics, and checks that a job left no agent and no shared memory."""

import json
import os
import subprocess
import sys
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt.py")
LAUNCHERS = {"memfit run": ["memfit.launcher.cli", "run"], "torchrun": ["torch.distributed.run", "--standalone"]}
MAX_STEPS = 12
INTERVAL = 2


def write_corpus(directory) -> str:
    path = os.path.join(directory, "corpus.txt")
    if not os.path.exists(path):
        source = open(os.path.join(ROOT, "memfit", "runtime", "engine.py"), "rb").read()
        with open(path, "wb") as file:
            file.write(source * 20)
    return path


def write_config(
    directory, persist_path=None, every_snapshots=2, keep_shm=False, offload=False, zero=None, **snapshot_keys
) -> str:
    """The crash tests' config; zero: keys to change in zero_optimization; snapshot_keys are
    further keys of the snapshot section."""
    snapshot = {"interval_steps": INTERVAL, "keep_shm": keep_shm, **snapshot_keys}
    if persist_path:
        snapshot["persist"] = {"path": persist_path, "every_snapshots": every_snapshots, "keep": 2}
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "seed": 1234,
        "steps_per_print": 100,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 0.003}},
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "offload_optimizer": {"device": "cpu" if offload else "none"},
        },
        "snapshot": snapshot,
    }
    config["zero_optimization"].update(zero or {})
    path = os.path.join(directory, f"config-{uuid.uuid4().hex[:6]}.json")
    with open(path, "w") as file:
        json.dump(config, file)
    return path


def new_shm_dir() -> str:
    return f"/dev/shm/memfit-test-{uuid.uuid4().hex[:10]}"


class Job:
    """`memfit run --max-restarts` of the example, in a session of its own."""

    def __init__(self, directory, config, shm_dir, metrics, fault=None, max_restarts=3, launcher="memfit run", nproc=2):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env["MEMFIT_SNAPSHOT_SHM_DIR"] = shm_dir
        env.pop("MEMFIT_FAULT_AT", None)
        if fault:
            env["MEMFIT_FAULT_AT"] = fault
        command = [sys.executable, "-m", *LAUNCHERS[launcher], "--nproc-per-node", str(nproc)]
        command += ["--max-restarts", str(max_restarts), EXAMPLE, "--config", config]
        command += ["--data", write_corpus(directory), "--max-steps", str(MAX_STEPS), "--eval-every", "1000"]
        command += ["--metrics", metrics, "--model-out", os.path.join(directory, "model.safetensors")]
        self.log_path = os.path.join(directory, f"job-{uuid.uuid4().hex[:6]}.log")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.shm_dir = shm_dir

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                if EXAMPLE in " ".join(child.cmdline()) and "memfit.checkpointing.agent" not in child.cmdline():
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    def wait(self, timeout_s=300) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def output(self) -> str:
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def kill_launcher_and_workers(self) -> None:
        """SIGKILL to the launcher and its workers at once (the agent, in its own session, is left)."""
        victims = self.workers() + [psutil.Process(self.process.pid)]
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        self.wait()


def agents_of(shm_dir: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "memfit.checkpointing.agent" in cmdline and shm_dir in cmdline:
            found.append(process)
    return found


def assert_cleaned_up(shm_dir: str, keep_shm: bool = False) -> None:
    """The agent has exited and, unless asked to keep it, removed its shared memory."""
    deadline = time.monotonic() + 10
    while agents_of(shm_dir) or (not keep_shm and os.path.exists(shm_dir)):
        if time.monotonic() > deadline:
            raise AssertionError(f"agent or shared memory left behind: {agents_of(shm_dir)}, {shm_dir}")
        time.sleep(0.1)


def read_metrics(path: str) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def check_against(records: list[dict], reference: list[dict]) -> list[int]:
    """Every step has its line, with the reference's loss; the final parameters are bit-identical and
    at most one snapshot interval of steps was redone per restore; returns the steps restored from."""
    expected = {record["step"]: record["loss"] for record in reference}
    for record in records:
        assert record["loss"] == expected[record["step"]], (record, expected[record["step"]])
    missing = sorted(set(range(1, MAX_STEPS + 1)) - {record["step"] for record in records})
    assert not missing, f"steps without a metrics line: {missing}"
    assert records[-1]["step"] == MAX_STEPS
    assert records[-1]["params_xxh3"] == reference[-1]["params_xxh3"]
    restored = []
    for index, record in enumerate(records):
        if "restored_from" in record:
            reached = max(r["step"] for r in records[:index]) if index else 0
            assert reached - record["restored_from"] <= INTERVAL, (reached, record)
            restored.append(record["restored_from"])
    return restored
