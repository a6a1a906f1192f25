"""Several simulated nodes on this machine for the snapshot parity tests: one `memfit run` per node
(1 rank each), each with its own shared-memory directory (MEMFIT_SNAPSHOT_SHM_DIR) and its own
loopback address (--local-addr 127.0.0.<node + 1>, which also fixes the node's place in torch's
rank order across rendezvous rounds), meeting in a c10d rendezvous whose store this process hosts
(so losing any node, the first included, leaves the store up: --rdzv-conf is_host=0).

Losing a node = SIGKILL to its launcher, its workers and its agent, then deleting its shared
memory; the other nodes' launchers restart their workers in a new rendezvous round, which the
relaunched node joins."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import psutil
import torch.distributed as dist

from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.parity import committed_parity
from tests.integration import snapshot_job
from tests.integration.snapshot_job import EXAMPLE, ROOT, agents_of, write_corpus

MAX_STEPS = 12


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(directory, parity="xor", parity_every=1, persist_path=None) -> str:
    return snapshot_job.write_config(
        directory, persist_path, every_snapshots=1, parity=parity, parity_every=parity_every
    )


class Cluster:
    """num_nodes `memfit run` launchers of the example, one rank each."""

    def __init__(
        self, directory, num_nodes: int, config: str, metrics: str, faults: dict | None = None, max_steps=MAX_STEPS
    ):
        self.directory = str(directory)
        self.num_nodes = num_nodes
        self.config = config
        self.metrics = metrics
        self.port = free_port()
        self.store = dist.TCPStore(
            "127.0.0.1",
            self.port,
            is_master=True,
            multi_tenant=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=60),
        )
        self.run_id = uuid.uuid4().hex[:8]
        self.shm_dirs = [f"/dev/shm/memfit-test-{self.run_id}-node{node}" for node in range(num_nodes)]
        self.logs: list[str] = []
        self.faults = faults or {}
        self.max_steps = max_steps
        self.launchers = [self.launch(node) for node in range(num_nodes)]

    def launch(self, node: int) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env["MEMFIT_SNAPSHOT_SHM_DIR"] = self.shm_dirs[node]
        env.pop("MEMFIT_FAULT_AT", None)
        if node in self.faults:
            env["MEMFIT_FAULT_AT"] = self.faults.pop(node)  # the first launch only
        command = [sys.executable, "-m", "memfit.launcher.cli", "run", "--nnodes", str(self.num_nodes)]
        command += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}"]
        command += ["--rdzv-id", self.run_id, "--rdzv-conf", "is_host=0", "--local-addr", f"127.0.0.{node + 1}"]
        command += ["--max-restarts", "3", "--monitor-interval", "0.1", EXAMPLE, "--config", self.config]
        command += ["--data", write_corpus(self.directory), "--max-steps", str(self.max_steps), "--eval-every", "1000"]
        command += ["--metrics", self.metrics]
        log_path = os.path.join(self.directory, f"node{node}-{len(self.logs)}.log")
        self.logs.append(log_path)
        with open(log_path, "w") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def processes_of(self, node: int) -> list[psutil.Process]:
        """The node's launcher, its workers and its agent."""
        launcher = self.launchers[node]
        found = []
        try:
            root = psutil.Process(launcher.pid)
            found = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        return found + agents_of(self.shm_dirs[node])

    def workers_of(self, node: int) -> list[psutil.Process]:
        found = []
        for process in self.processes_of(node):
            try:
                if EXAMPLE in process.cmdline() and process.pid != self.launchers[node].pid:
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
        return found

    def lose_node(self, node: int) -> None:
        """SIGKILL to everything of the node at once, then its shared memory is gone."""
        victims = self.processes_of(node)
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        self.launchers[node].wait()
        shutil.rmtree(self.shm_dirs[node], ignore_errors=True)

    def relaunch(self, node: int) -> None:
        self.launchers[node] = self.launch(node)

    def wait(self, timeout_s: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout_s
        statuses = []
        for launcher in self.launchers:
            statuses.append(launcher.wait(timeout=max(1.0, deadline - time.monotonic())))
        return statuses

    def kill_all(self) -> None:
        for node in range(self.num_nodes):
            self.lose_node(node)

    def output(self) -> str:
        texts = []
        for path in self.logs:
            with open(path, errors="replace") as file:
                texts.append(f"==== {os.path.basename(path)}\n" + file.read()[-4000:])
        return "\n".join(texts)

    def parity_steps(self) -> list[int | None]:
        """Per node, the step of its newest committed parity round (None: none yet)."""
        steps = []
        for node, shm_dir in enumerate(self.shm_dirs):  # one rank per node: rank = node
            try:
                readers = committed_parity(shm_dir, node)
            except (CheckpointError, OSError):
                readers = []
            steps.append(readers[0].step if readers else None)
        return steps

    def steps_done(self) -> int:
        if not os.path.exists(self.metrics):
            return 0
        with open(self.metrics) as file:
            lines = [line for line in file if line.endswith("\n")]  # a line being written is left out
        return json.loads(lines[-1])["step"] if lines else 0
