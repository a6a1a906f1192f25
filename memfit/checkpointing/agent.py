"""The snapshot agent: one process per node that owns the shared-memory slots, so a snapshot
outlives the workers that torchrun tears down and restarts, and persists snapshots to disk off the
training path.

Lifetime. The agent runs in a session of its own (torchrun kills each failed worker's process
group, and a plain child of a worker would die with it). `memfit run` starts it before the workers;
under plain torchrun the first worker to ask starts it, and a lock file held by the agent for its
whole life makes that idempotent across restarts and local ranks. It watches the launcher's pid
and exits when the launcher is gone (the job ended, or the launcher was killed), removing the
slots unless asked to keep them.

Requests come over a Unix socket in the slot directory, one JSON line each way:
    allocate  {rank, bytes[, kind]}   create or grow the rank's two slots, or with kind "parity" its
                                      two parity slots (posix_fallocate, after checking the file
                                      system has room: a full tmpfs would SIGBUS the writer instead
                                      of failing)
    acquire   {rank, slot}            returns once the slot is not being persisted (the writer is
                                      about to overwrite it)
    committed {rank, slot, step, ...} a slot holds a new snapshot; every `persist` one is written to
                                      disk once all local ranks have committed it (persist.py)
    ping
Bulk bytes never go through the socket.
"""

import argparse
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

from memfit.checkpointing.parity import PARITY_SLOTS_PER_RANK, parity_path
from memfit.checkpointing.private_dir import (
    UnsafeDirectoryError,
    check_directory,
    open_private,
    prepare_directory,
    remove_created,
)
from memfit.checkpointing.slots import SLOTS_PER_RANK, slot_path

SOCKET_NAME = "agent.sock"
LOCK_NAME = "agent.lock"
SPAWN_LOCK_NAME = "agent.spawn.lock"
WATCH_INTERVAL_S = 0.2
START_TIMEOUT_S = 60.0

logger = logging.getLogger("memfit.agent")


class AgentError(OSError):
    """The agent refused a request or cannot be reached; the message says why."""


# ---- client side (workers, launcher) ------------------------------------------------------------
def request(shm_dir: str, message: dict, timeout_s: float | None = 600.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout_s)
        try:
            connection.connect(os.path.join(shm_dir, SOCKET_NAME))
            connection.sendall(json.dumps(message).encode() + b"\n")
            reply = connection.makefile("rb").readline()
        except OSError as error:
            raise AgentError(f"snapshot agent at {shm_dir}: {error.strerror or error}") from None
    if not reply:
        raise AgentError(f"snapshot agent at {shm_dir}: no reply to {message['op']}")
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise AgentError(answer.get("error", "refused"))
    return answer


def ping(shm_dir: str) -> dict | None:
    """The running agent's answer (pid, job, watched launcher pid), or None when none answers."""
    try:
        return request(shm_dir, {"op": "ping"}, timeout_s=5.0)
    except AgentError:
        return None


def is_running(shm_dir: str) -> bool:
    return ping(shm_dir) is not None


def ensure_agent(
    shm_dir: str, watch_pid: int, agent_args: list[str] = (), keep_shm: bool = False, job: str = ""
) -> None:
    """Starts the node's agent for `job` unless it runs already; returns once it answers. The
    directory must be this user's alone (private_dir.py); an agent of another job still running
    there is refused (two jobs would share, and restore, each other's slots)."""
    try:
        prepare_directory(shm_dir)
        spawn_lock_path = os.path.join(shm_dir, SPAWN_LOCK_NAME)
        spawn_lock = os.fdopen(open_private(spawn_lock_path, os.O_WRONLY), "w")
    except OSError as error:
        raise AgentError(str(error) if isinstance(error, UnsafeDirectoryError) else f"{shm_dir}: {error}") from None
    started = False
    try:
        fcntl.flock(spawn_lock, fcntl.LOCK_EX)  # one starter at a time; the others find it running
        if _running_for(shm_dir, job):
            started = True
            return
        command = [sys.executable, "-m", "memfit.checkpointing.agent", shm_dir, "--watch-pid", str(watch_pid)]
        command += list(agent_args) + (["--keep-shm"] if keep_shm else []) + (["--job", job] if job else [])
        # The agent's log lines go where the starter's stderr goes: the job's output.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not is_running(shm_dir):
            if process.poll() is not None:
                raise AgentError(f"snapshot agent exited at start (status {process.returncode}); see its lines above")
            if time.monotonic() > deadline:
                raise AgentError(f"snapshot agent did not answer within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        started = True
    finally:
        spawn_lock.close()
        if not started and not is_running(shm_dir):  # nothing of a failed start stays behind
            remove_created(shm_dir, keep_slots=True)


def _running_for(shm_dir: str, job: str) -> bool:
    """True when the agent of `job` answers in shm_dir. An agent of another job whose launcher is
    gone (a relaunch right after a kill) is waited for; one whose launcher lives is refused."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (answer := ping(shm_dir)) is not None:
        running_job = answer.get("job", "")
        if not job or not running_job or running_job == job:
            return True
        if _alive(int(answer.get("watch_pid", 0))):
            raise AgentError(
                f"{shm_dir}: in use by another running job ({running_job}, snapshot agent pid {answer['pid']}); "
                "give this job a snapshot.shm_dir (or MEMFIT_SNAPSHOT_SHM_DIR) of its own"
            )
        if time.monotonic() > deadline:
            raise AgentError(f"{shm_dir}: the snapshot agent of an ended job ({running_job}) did not exit")
        time.sleep(0.1)
    return False


# ---- the agent ----------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def preallocate(path: str, num_bytes: int) -> None:
    descriptor = open_private(path, os.O_RDWR)
    try:
        if os.fstat(descriptor).st_size < num_bytes:
            os.posix_fallocate(descriptor, 0, num_bytes)
    finally:
        os.close(descriptor)


class Agent:
    def __init__(self, shm_dir: str, persister=None, job: str = "", watch_pid: int = 0):
        self.shm_dir = shm_dir
        self.job, self.watch_pid = job, watch_pid
        self.persister = persister
        self._lock = threading.Condition()
        self._busy: set[tuple[int, int]] = set()  # (rank, slot) being read by a persist

    def handle(self, message: dict) -> dict:
        op = message.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "job": self.job, "watch_pid": self.watch_pid}
        if op == "allocate":
            return self.allocate(int(message["rank"]), int(message["bytes"]), message.get("kind", "data"))
        if op == "acquire":
            key = (int(message["rank"]), int(message["slot"]))
            with self._lock:
                self._lock.wait_for(lambda: key not in self._busy)
            return {"ok": True}
        if op == "committed":
            if self.persister is not None and message.get("persist"):
                self.persister.committed(message, self)
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def allocate(self, rank: int, num_bytes: int, kind: str = "data") -> dict:
        if kind not in ("data", "parity"):
            return {"ok": False, "error": f"unknown slot kind {kind!r}"}
        if kind == "parity":
            paths = [parity_path(self.shm_dir, rank, slot) for slot in range(PARITY_SLOTS_PER_RANK)]
        else:
            paths = [slot_path(self.shm_dir, rank, slot) for slot in range(SLOTS_PER_RANK)]
        missing = sum(max(0, num_bytes - (os.path.getsize(p) if os.path.exists(p) else 0)) for p in paths)
        usage = shutil.disk_usage(self.shm_dir)
        if missing > usage.free:
            return {
                "ok": False,
                "error": f"{self.shm_dir}: snapshot {kind} slots of rank {rank} need {missing} more bytes "
                f"({len(paths)} x {num_bytes}), {usage.free} bytes free; give the tmpfs more room "
                "(docker --shm-size) or point snapshot.shm_dir elsewhere",
            }
        try:
            for path in paths:
                preallocate(path, num_bytes)
        except UnsafeDirectoryError as error:
            return {"ok": False, "error": str(error)}
        except OSError as error:
            return {"ok": False, "error": f"{self.shm_dir}: cannot reserve {num_bytes} bytes: {error.strerror}"}
        return {"ok": True, "paths": paths}

    def hold(self, keys) -> None:
        with self._lock:
            self._lock.wait_for(lambda: not (set(keys) & self._busy))
            self._busy |= set(keys)

    def release(self, keys) -> None:
        with self._lock:
            self._busy -= set(keys)
            self._lock.notify_all()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        if not line:
            return
        try:
            reply = self.server.agent.handle(json.loads(line))
        except Exception as error:  # a bad request must not stop the agent
            logger.exception("request failed")
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memfit.checkpointing.agent")
    parser.add_argument("shm_dir")
    parser.add_argument("--watch-pid", type=int, required=True, help="exit when this process (the launcher) is gone")
    parser.add_argument("--keep-shm", action="store_true", help="leave the slots in place at exit")
    parser.add_argument("--persist-path", default=None)
    parser.add_argument("--persist-keep", type=int, default=2)
    parser.add_argument("--persist-group-access", action="store_true", help="persisted files 0640, directories 0750")
    parser.add_argument("--job", default="", help="the job this agent holds snapshots for")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s memfit agent {os.getpid()}: %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # clean up on the way out
    try:
        check_directory(args.shm_dir)
        lock = os.fdopen(open_private(os.path.join(args.shm_dir, LOCK_NAME), os.O_WRONLY), "w")
    except OSError as error:
        logger.error("%s", error)
        return 1
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info("another agent holds %s; exiting", args.shm_dir)
        return 0
    persister = None
    if args.persist_path:
        from memfit.checkpointing.persist import Persister

        persister = Persister(args.persist_path, args.persist_keep, group_access=args.persist_group_access)
    agent = Agent(args.shm_dir, persister, args.job, args.watch_pid)
    socket_path = os.path.join(args.shm_dir, SOCKET_NAME)
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # left by an agent that was killed
    server = _Server(socket_path, _Handler)
    server.agent = agent
    threading.Thread(target=server.serve_forever, name="memfit-agent-server", daemon=True).start()
    logger.info("holding snapshots in %s for launcher pid %d", args.shm_dir, args.watch_pid)
    try:
        while _alive(args.watch_pid):
            time.sleep(WATCH_INTERVAL_S)
        logger.info("launcher %d is gone; exiting", args.watch_pid)
        server.shutdown()
        if persister is not None:
            persister.close()
    finally:
        server.server_close()
        # only what memfit made, and the directory only if memfit made it
        remove_created(args.shm_dir, keep_slots=args.keep_shm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
