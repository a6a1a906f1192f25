"""Lazy persistence of snapshots, in the agent, off the training path: a committed snapshot is
written from the slots to disk as a checkpoint of disk.py's format, so engine.load_checkpoint
(and the example's --resume) reads it at any world size.

Commit across ranks and nodes (the persist path is shared by all nodes):
  1. each node's agent writes its local ranks' files into <path>/.tmp-snapshot-global_step<N>/
     (torch.save of the payload read back from the slot, checksums verified first; each file
     fsynced), then a marker node<k>.json with their manifest entries, written durably;
  2. the agent of node 0 waits until the markers cover every rank, writes the manifest, fsyncs it
     and the directory, renames the directory into place, fsyncs <path>, and replaces `latest`.
     It waits on a thread per step, so that a node lost before writing its marker does not stop
     node 0 from persisting its own later snapshots (the slots it holds meanwhile would stop the
     workers' next snapshot). A step this agent has committed already (a job that redoes steps
     after a restore writes the same state again) is not persisted again.
A failure anywhere (ENOSPC, a node that never writes its marker) leaves no manifest: the
temporary directory is removed and the previous persisted snapshot stays whole. Training is not
told; the agent logs the error.
While a slot is being persisted it is held (agent.hold), so its writer waits before overwriting it.
"""

import json
import logging
import os
import queue
import shutil
import threading
import time

import torch

from memfit.checkpointing.disk import (
    DEFAULT_TAG_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    _rotate,
    _sealed,
    _swap_into_place,
    _write_durably,
    _write_payload,
    access_modes,
    make_directory,
    rank_file_name,
)
from memfit.checkpointing.faults import fault_point
from memfit.checkpointing.integrity import CheckpointError, describe_os_error, fsync_directory
from memfit.checkpointing.slots import SlotReader, slot_path

logger = logging.getLogger("memfit.agent")

TEMPORARY_PREFIX = ".tmp-snapshot-"
NODES_WAIT_S = 600.0


def _read_json(path: str) -> dict | None:
    if not os.path.basename(path).startswith("node") or not path.endswith(".json"):
        return None
    with open(path) as file:
        return json.load(file)


def _with_copies(tree):
    if torch.is_tensor(tree):
        return tree.clone()
    if isinstance(tree, dict):
        return {key: _with_copies(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_with_copies(value) for value in tree]
    return tree


class Persister:
    def __init__(self, path: str, keep: int, group_access: bool = False):
        self.path = path
        self.keep = keep
        self.file_mode, self.directory_mode = access_modes(group_access)
        self._pending: dict[int, dict[int, dict]] = {}  # step -> rank -> committed message
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._commits: dict[int, threading.Thread] = {}  # step -> the thread committing it (node 0)
        self._committed_steps: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="memfit-persist", daemon=True)
        self._thread.start()

    def committed(self, message: dict, agent) -> None:
        """Called for each rank's committed snapshot that is due for persistence; once every local
        rank has committed the step, its slots are held and the persist is queued."""
        step = int(message["step"])
        with self._lock:
            for other in [s for s in self._pending if s != step]:  # left by ranks of a killed attempt
                del self._pending[other]
            ranks = self._pending.setdefault(step, {})
            ranks[int(message["rank"])] = message
            if len(ranks) < int(message["local_world_size"]):
                return
            del self._pending[step]
        keys = [(rank, int(m["slot"])) for rank, m in ranks.items()]
        agent.hold(keys)  # before replying: the writer cannot start overwriting these slots
        self._queue.put((step, ranks, keys, agent))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            step, ranks, keys, agent = job
            started = time.perf_counter()
            try:
                self.persist(step, ranks, agent, keys)
            except Exception as error:
                logger.error("persisting the snapshot of step %d failed: %s", step, error)
            else:
                logger.info("persisted step %d in %.2f s", step, time.perf_counter() - started)

    def persist(self, step: int, ranks: dict[int, dict], agent, keys) -> None:
        any_message = next(iter(ranks.values()))
        tag = f"{DEFAULT_TAG_PREFIX}{step}"
        temporary = os.path.join(self.path, TEMPORARY_PREFIX + tag)
        node_rank = int(any_message["node_rank"])
        if step in self._committed_steps:
            agent.release(keys)
            logger.info("step %d is persisted already; not writing it again", step)
            return
        try:
            make_directory(self.path, self.directory_mode, exist_ok=True)
            make_directory(temporary, self.directory_mode, exist_ok=True)
            entries, owner_of, micro_step, identity = [], None, None, {}
            for rank, message in sorted(ranks.items()):
                reader = SlotReader(slot_path(agent.shm_dir, rank, int(message["slot"])))
                reader.verify()
                if reader.step != step:
                    raise CheckpointError(f"{reader.path}: holds step {reader.step}, expected {step}")
                # torch.save refuses views of one storage as several dtypes: one copy per tensor
                payload = _with_copies(reader.payload(verify=False))
                path = os.path.join(temporary, rank_file_name(rank))
                entries.append(_write_payload(payload, path, self.file_mode))
                fault_point("snapshot-persisting")
                owner_of, micro_step = reader.index["owner_of"], payload["micro_step"]
                identity = {key: reader.index[key] for key in ("job", "fingerprint") if key in reader.index}
            marker = {"entries": entries, "owner_of": owner_of, "micro_step": micro_step, **identity}
            # by rename: node 0's agent reads markers while other nodes write theirs
            _write_durably(os.path.join(temporary, f".node{node_rank}.json"), json.dumps(marker), self.file_mode)
            os.replace(
                os.path.join(temporary, f".node{node_rank}.json"), os.path.join(temporary, f"node{node_rank}.json")
            )
        except (CheckpointError, OSError) as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise CheckpointError(
                describe_os_error(error, temporary) if isinstance(error, OSError) else str(error)
            ) from None
        finally:
            agent.release(keys)  # the files are durable (or abandoned): the slots may be overwritten
        if node_rank != 0:
            return
        with self._lock:
            if step in self._committed_steps:  # committed while these files were written
                shutil.rmtree(temporary, ignore_errors=True)
                return
            running = self._commits.get(step)
            if running is not None and running.is_alive():
                return  # it has not renamed the directory yet: it reads the markers just written
            arguments = (step, tag, temporary, int(any_message["world_size"]), int(any_message.get("stage", 0)))
            thread = threading.Thread(target=self._commit_logged, args=arguments, name="memfit-commit", daemon=True)
            self._commits[step] = thread
        thread.start()

    def _commit_logged(self, step: int, *arguments) -> None:
        started = time.perf_counter()
        try:
            committed = self._commit(step, *arguments)
        except Exception as error:
            logger.error("persisting the snapshot of step %d failed: %s", step, error)
        else:
            if committed:
                logger.info("committed step %d in %.2f s", step, time.perf_counter() - started)

    def _commit(self, step: int, tag: str, temporary: str, world_size: int, stage: int) -> bool:
        deadline = time.monotonic() + NODES_WAIT_S
        while True:
            if step in self._committed_steps:
                shutil.rmtree(temporary, ignore_errors=True)
                return False
            markers = [_read_json(os.path.join(temporary, name)) for name in sorted(os.listdir(temporary))]
            markers = [marker for marker in markers if marker is not None]
            files = {entry["file"]: entry for marker in markers for entry in marker["entries"]}
            if len(files) >= world_size:
                break
            if time.monotonic() > deadline:
                shutil.rmtree(temporary, ignore_errors=True)
                raise CheckpointError(f"{temporary}: {len(files)} of {world_size} rank files after {NODES_WAIT_S:g} s")
            time.sleep(0.1)
        body = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tag": tag,
            "global_step": step,
            "micro_step": markers[0]["micro_step"],
            "world_size": world_size,
            "stage": stage,
            "owner_of": markers[0]["owner_of"],
            "files": files,
            **{key: markers[0][key] for key in ("job", "fingerprint") if key in markers[0]},
        }
        try:
            _write_durably(os.path.join(temporary, MANIFEST), json.dumps(_sealed(body), indent=1), self.file_mode)
            fsync_directory(temporary)
            final = os.path.join(self.path, tag)
            with self._lock:  # a share of this step written from now on is not waited for (persist)
                _swap_into_place(temporary, final)
                self._committed_steps.add(step)
            fsync_directory(self.path)
            _write_durably(os.path.join(self.path, LATEST + ".tmp"), tag, self.file_mode)
            os.replace(os.path.join(self.path, LATEST + ".tmp"), os.path.join(self.path, LATEST))
            fsync_directory(self.path)
        except OSError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise CheckpointError(describe_os_error(error, error.filename or self.path)) from None
        _rotate(self.path, self.keep, protect=tag)
        return True

    def close(self) -> None:
        """Finishes the persists already queued, and their commits."""
        self._queue.put(None)
        self._thread.join()
        with self._lock:
            commits = list(self._commits.values())
        for thread in commits:
            thread.join()
