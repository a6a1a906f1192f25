"""The worker's side of in-memory snapshots: every `interval_steps` optimizer steps, the rank's
training state goes into one of its two shared-memory slots, which the node's agent holds.

Design note (the lazy copy of DataStates-LLM and CheckFreq). At a snapshot step, right after the
optimizer step:
  1. eagerly, on the training thread: what forward mutates or what is cheap (module buffers, RNG
     states, scheduler, step counters, the client's state, all non-tensor values);
  2. lazily, on a background thread, into the slot not holding the newest snapshot: parameters
     (fp32 masters), optimizer state and frozen parameters, i.e. the rank's owned shard. Forward
     and backward of the next step do not write these tensors; only the optimizer step does.
  3. wait_for_copy(), called by the engine at the start of the next optimizer step, blocks until
     the copy is done (the training stall, usually zero). The copy commits the slot (index, then
     the sequence number last) and tells the agent; on the rank with monitors, only once the
     step's records are complete (memfit/monitor/master.py), so every step a restore resumes
     past has its metrics written.
  4. with snapshot.parity "xor", every `parity_every`-th snapshot is followed by a parity round
     (parity_exchange.py) on a thread of its own, at a lower priority (parity_nice), from the
     committed slot; the next snapshot's copy waits for it (not the training thread, unless a
     round outlasts a snapshot interval).
Invariant: at most one snapshot is in flight, and a slot is written only after the agent says it
is not being persisted. With parity, a snapshot never overwrites the slot of the last complete
parity round (it takes the other slot), so that round stays rebuildable until the next one.

The client's data position: `engine.set_client_state(dict_or_callable)`; a callable is called at
each snapshot, so it can report the position the loop has reached. A restore hands it back as
`engine.client_state`.
"""

import atexit
import copy
import logging
import os
import threading
import time
import warnings

from memfit.checkpointing import agent
from memfit.checkpointing.client_state import check_client_state
from memfit.checkpointing.faults import fault_point
from memfit.checkpointing.identity import JOB_ID_ENV, job_id
from memfit.checkpointing.integrity import CheckpointError, walk_tensors
from memfit.checkpointing.parity_exchange import ParityGroups, ParityRounds, lower_thread_priority
from memfit.checkpointing.slots import (
    SLOTS_PER_RANK,
    SlotFile,
    index_for,
    layout,
    needed_bytes,
    newest_committed,
    slot_path,
    tensor_entry,
)
from memfit.checkpointing.state import export_rank_state
from memfit.config.snapshot import DEFAULT_SHM_ROOT, SHM_DIR_ENV
from memfit.optim.planned_state import planned_state_bytes
from memfit.runtime import lifecycle

logger = logging.getLogger("memfit")

__all__ = ["JOB_ID_ENV", "Snapshotter", "agent_arguments", "build_snapshotter", "resolve_shm_dir"]


def resolve_shm_dir(config) -> str:
    """MEMFIT_SNAPSHOT_SHM_DIR, else snapshot.shm_dir, else /dev/shm/memfit-<job id>."""
    if os.environ.get(SHM_DIR_ENV):
        return os.path.abspath(os.environ[SHM_DIR_ENV])
    if config.shm_dir:
        return config.shm_dir
    return os.path.join(DEFAULT_SHM_ROOT, f"memfit-{job_id()}")


def agent_arguments(config, group_access: bool = False) -> list[str]:
    if config.persist.path is None:
        return []
    arguments = ["--persist-path", os.path.abspath(config.persist.path), "--persist-keep", str(config.persist.keep)]
    return arguments + (["--persist-group-access"] if group_access else [])


class Snapshotter:
    def __init__(self, config, engine):
        self.config = config
        self.interval_steps = config.interval_steps
        self.shm_dir = resolve_shm_dir(config)
        self.rank, self.world_size = engine.rank, engine.world_size
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", engine.world_size))
        self.node_rank = int(os.environ.get("GROUP_RANK", "0"))
        self.stage = engine.stage
        monitor = engine.monitor
        self.step_records = monitor if monitor is not None and monitor.enabled else None
        owner_of = engine.ownership()["owner_of"]
        self.owner_of = {name: owner if engine.stage > 0 else 0 for name, owner in owner_of.items()}
        # Without a launcher there is no restart to survive: the agent lives as long as this process.
        watched = lifecycle.launcher_pid() if lifecycle.started_by_launcher() else os.getpid()
        self.identity = {"job": engine.job_id, "fingerprint": engine.fingerprint}
        group_access = engine.config.checkpoint.group_access
        agent.ensure_agent(self.shm_dir, watched, agent_arguments(config, group_access), config.keep_shm, engine.job_id)
        committed = newest_committed(self.shm_dir, self.rank)
        self.sequence = max((reader.sequence for reader in committed), default=0)
        newest_slot = int(committed[0].path[-1]) if committed else SLOTS_PER_RANK - 1
        self.next_slot = (newest_slot + 1) % SLOTS_PER_RANK
        self.num_snapshots = 0
        self._slots: list[SlotFile | None] = [None] * SLOTS_PER_RANK
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stall_s = 0.0  # total time the optimizer step waited for a copy
        self.parity_groups, self.parity = parity_setup(
            config, self.shm_dir, self.world_size, self.local_world_size, self.rank
        )
        self.protected_slot = self._parity_protected_slot()
        self._parity_thread: threading.Thread | None = None
        self.parity_nice = config.parity_nice  # what each round's thread adds to its nice value
        # Reserve the slots now, so a tmpfs without room fails the start, not the first snapshot.
        self._slot(self.next_slot, estimated_bytes(engine))
        atexit.register(self.close)  # before the process group goes: a parity round may be running

    def _parity_protected_slot(self) -> int | None:
        """The slot holding the step of this rank's newest complete parity round, if any."""
        if self.parity is None or self.parity.newest_step is None:
            return None
        for reader in newest_committed(self.shm_dir, self.rank):
            if reader.step == self.parity.newest_step:
                return int(reader.path[-1])
        return None

    def restored(self, slot: int | None, step: int) -> None:
        """After a restore from `slot`: the next snapshot must not overwrite it."""
        if slot is not None:
            self.next_slot = (slot + 1) % SLOTS_PER_RANK
        self.num_snapshots = step // self.interval_steps if self.interval_steps else 0
        # a slot rebuilt from parity carries the sequence number it was committed with
        committed = newest_committed(self.shm_dir, self.rank)
        self.sequence = max([self.sequence] + [reader.sequence for reader in committed])
        self.protected_slot = self._parity_protected_slot()

    # ---- the step hooks -------------------------------------------------------------------------
    def wait_for_copy(self) -> None:
        """At the start of an optimizer step: join_copy, at a fault-injection point."""
        fault_point("snapshot-barrier", self.rank)  # the n-th optimizer step, before it updates
        self.join_copy()

    def join_copy(self) -> None:
        """Blocks until the last snapshot's copy is done; raises if it failed."""
        if self._thread is not None:
            if self.step_records is not None:
                self.step_records.finish_step()  # the copy may be waiting for them to commit
            started = time.perf_counter()
            self._thread.join()
            self.stall_s += time.perf_counter() - started
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"snapshot of rank {self.rank} failed: {error}") from error

    def after_step(self, engine) -> None:
        if not self.interval_steps or engine.global_step % self.interval_steps != 0:
            return
        self.join_copy()
        source = engine._client_state_source
        client_state = source() if callable(source) else (source or {})
        # checked again here: a dict given once is usually updated in place as training goes on
        check_client_state(
            client_state, "engine.set_client_state" + (" (what its callable returned)" if callable(source) else "")
        )
        payload = export_rank_state(engine, copy.deepcopy(client_state))
        # Forward mutates buffers (batch-norm statistics): copy them now. RNG states are copies.
        payload["buffers"] = {name: buffer.clone() for name, buffer in payload["buffers"].items()}
        self.num_snapshots += 1
        persist = self.config.persist.path is not None and self.num_snapshots % self.config.persist.every_snapshots == 0
        parity_due = self.parity is not None and self.num_snapshots % self.config.parity_every == 0
        index_header = index_for(payload, engine.global_step, self.world_size, self.rank, self.owner_of, [])
        index_header.update(self.identity)
        job = (needed_bytes(payload), payload, index_header, persist, parity_due)
        self._thread = threading.Thread(target=self._copy, args=job, name="memfit-snapshot", daemon=True)
        self._thread.start()

    def _slot(self, slot: int, num_bytes: int) -> SlotFile:
        current = self._slots[slot]
        if current is not None and current.num_bytes >= num_bytes:
            return current
        agent.request(self.shm_dir, {"op": "allocate", "rank": self.rank, "bytes": num_bytes})
        if current is not None:
            current.close()
        self._slots[slot] = SlotFile(slot_path(self.shm_dir, self.rank, slot))
        return self._slots[slot]

    def _choose_slot(self) -> int:
        """The slot the next snapshot goes to: not the one of the last complete parity round."""
        if self._parity_thread is not None:
            self._parity_thread.join()  # the round reads a slot, and decides which one is protected
            self._parity_thread = None
        slot = self.next_slot
        if slot == self.protected_slot:
            slot = (slot + 1) % SLOTS_PER_RANK
        self.next_slot = (slot + 1) % SLOTS_PER_RANK
        return slot

    def _copy(self, num_bytes: int, payload: dict, index: dict, persist: bool, parity_due: bool) -> None:
        try:
            slot = self._choose_slot()
            slot_file = self._slot(slot, num_bytes)
            agent.request(self.shm_dir, {"op": "acquire", "rank": self.rank, "slot": slot})
            slot_file.invalidate()
            entries = []
            for number, (path, tensor, offset) in enumerate(layout(payload)[0]):
                entries.append(tensor_entry(path, tensor, offset, slot_file.copy_tensor(tensor, offset)))
                if number == 0:
                    fault_point("snapshot-copying", self.rank)
            index["tensors"] = entries
            if self.step_records is not None and not self.step_records.wait_for_records(index["step"]):
                return  # a crash lost the step's records: the previous snapshot stays the one to restore
            self.sequence += 1
            slot_file.commit(index["step"], self.sequence, index)
            fault_point("snapshot-committed", self.rank)
            message = {
                "op": "committed",
                "rank": self.rank,
                "slot": slot,
                "step": index["step"],
                "world_size": self.world_size,
                "local_world_size": self.local_world_size,
                "node_rank": self.node_rank,
                "stage": self.stage,
                "persist": persist,
            }
            agent.request(self.shm_dir, message)
            if persist:
                fault_point("snapshot-persist-requested", self.rank)
            if parity_due:
                self._parity_thread = threading.Thread(
                    target=self._parity_round, args=(slot_file, slot, index["step"]), name="memfit-parity", daemon=True
                )
                self._parity_thread.start()
        except BaseException as error:  # reported at the next optimizer step, on the training thread
            self._error = error

    def _parity_round(self, slot_file: SlotFile, slot: int, step: int) -> None:
        """A failed round costs redundancy, not training: the previous round stays usable, and the
        error is logged (a node that died fails the training collectives on its own)."""
        try:
            lower_thread_priority(self.parity_nice)
            self.parity.run(slot_file.bytes[: slot_file.used_bytes()], step)
        except Exception as error:
            logger.warning(
                "rank %d: parity round of step %d failed (%s); the previous one stays in use", self.rank, step, error
            )
            return
        self.protected_slot = slot

    def close(self) -> None:
        if self._thread is not None:
            if self.step_records is not None:
                self.step_records.close_at_exit()  # its records complete (or lost) the waiting copy
            self._thread.join()
            self._thread = None
        if self._parity_thread is not None:
            self._parity_thread.join()
            self._parity_thread = None
        if self.parity is not None:
            self.parity.close()
        for slot_file in self._slots:
            if slot_file is not None:
                slot_file.close()
        self._slots = [None] * SLOTS_PER_RANK


def estimated_bytes(engine) -> int:
    """Slot bytes for the engine's state before its first step: the payload as it is, plus the
    state the optimizer has yet to create (its planned state less what it holds), so that a slot
    that fits at the start is never outgrown by the first snapshot (amsgrad's third moment
    included)."""
    payload = export_rank_state(engine, {})
    held = sum(tensor.numel() * tensor.element_size() for _, tensor in walk_tensors(payload["optimizer_state"]))
    return needed_bytes(payload) + max(0, planned_state_bytes(engine.optimizer) - held)


def parity_setup(config, shm_dir: str, world_size: int, local_world_size: int, rank: int):
    """(ParityGroups, ParityRounds) for snapshot.parity "xor" on two or more nodes, else (None, None)
    with a warning when xor was asked for but cannot work. Collective: every rank calls it."""
    if config.parity != "xor":
        return None, None
    if world_size % local_world_size or world_size // local_world_size < 2:
        warnings.warn(
            f'snapshot.parity "xor" needs two or more nodes with the same number of ranks '
            f"({world_size} rank(s), {local_world_size} per node); parity is off",
            stacklevel=2,
        )
        return None, None
    groups = ParityGroups(world_size, local_world_size, rank, nice=config.parity_nice)
    return groups, ParityRounds(groups, shm_dir, world_size)


def build_snapshotter(config, engine) -> Snapshotter | None:
    """The snapshotter for snapshot config `config`, or None when snapshots are off."""
    if not config.interval_steps:
        return None
    return Snapshotter(config, engine)
