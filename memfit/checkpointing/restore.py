"""Restoring a job from its snapshots when its workers start: the newest step every rank can
restore, from the node's shared-memory slots, else the newest good persisted snapshot.

The ranks agree on the step with one exchange: each rank lists the steps of the slots it can read
and verify (its own, and rank 0's when it needs them: stage 0 keeps every parameter on rank 0, and
frozen parameters are saved by rank 0), and the newest step in every list wins. A torn slot (a
writer killed mid-copy) or a corrupted one (a checksum mismatch) is not listed, so the previous
snapshot is taken. Without a common step in memory (the whole node was restarted, or the world
size changed), the persisted checkpoints are tried newest first; one that fails its checksums is
skipped with a warning.
"""

import logging
import os

import torch.distributed as dist

from memfit.checkpointing.disk import DEFAULT_TAG_PREFIX, load_checkpoint, read_manifest
from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.slots import SlotReader, SlotSource, newest_committed
from memfit.checkpointing.state import restore_rank_state

logger = logging.getLogger("memfit")


def _readable_steps(shm_dir: str, rank: int, world_size: int) -> dict[int, SlotReader]:
    steps = {}
    for reader in newest_committed(shm_dir, rank):
        if reader.index["world_size"] != world_size:
            continue
        try:
            reader.verify()
        except CheckpointError as error:
            logger.warning("snapshot slot skipped: %s", error)
            continue
        steps.setdefault(reader.step, reader)
    return steps


def _gather(engine, value) -> list:
    if engine.world_size == 1:
        return [value]
    values = [None] * engine.world_size
    dist.all_gather_object(values, value)
    return values


def restore_from_memory(engine, shm_dir: str) -> tuple[int, int] | None:
    """(step, slot of this rank) restored from shared memory, or None when no step is common."""
    needs_rank0 = engine.stage == 0 or any(not p.requires_grad for p in engine.module.parameters())
    needed = sorted({engine.rank, 0} if needs_rank0 else {engine.rank})
    readable = {rank: _readable_steps(shm_dir, rank, engine.world_size) for rank in needed}
    local_steps = set.intersection(*(set(steps) for steps in readable.values()))
    common = set.intersection(*(set(steps) for steps in _gather(engine, sorted(local_steps))))
    if not common:
        return None
    step = max(common)
    source = SlotSource({rank: readable[rank][step] for rank in needed})
    error = None
    try:
        engine.client_state = restore_rank_state(engine, source)
    except CheckpointError as failure:
        error = str(failure)
    failures = [message for message in _gather(engine, error) if message]
    if failures:
        raise CheckpointError(f"restoring the snapshot of step {step} failed: {failures[0]}")
    return step, int(readable[engine.rank][step].path[-1])


def persisted_tags(persist_path: str) -> list[str]:
    """Tags of complete persisted snapshots, newest step first."""
    if not os.path.isdir(persist_path):
        return []
    found = []
    for name in os.listdir(persist_path):
        if name.startswith(DEFAULT_TAG_PREFIX):
            manifest = read_manifest(os.path.join(persist_path, name), quiet=True)
            if manifest is not None:
                found.append((manifest["global_step"], name))
    return [name for _, name in sorted(found, reverse=True)]


def restore_from_disk(engine, persist_path: str) -> int | None:
    for tag in persisted_tags(persist_path):
        try:
            engine.client_state = load_checkpoint(engine, persist_path, tag)
        except CheckpointError as error:
            logger.warning("persisted snapshot %s skipped: %s", tag, error)
            continue
        return engine.global_step
    return None


def restore_latest(engine, snapshotter) -> int | None:
    """Restores the newest snapshot every rank can restore; returns its step, or None."""
    restored = restore_from_memory(engine, snapshotter.shm_dir)
    if restored is not None:
        step, slot = restored
        where = f"shared memory ({snapshotter.shm_dir})"
    else:
        persist_path = snapshotter.config.persist.path
        step, slot = (restore_from_disk(engine, persist_path) if persist_path else None), None
        where = f"disk ({persist_path})"
    if step is None:
        return None
    snapshotter.restored(slot, step)
    engine.restored_from = step
    if engine.rank == 0:
        logger.info("restored the snapshot of step %d from %s", step, where)
    return step
