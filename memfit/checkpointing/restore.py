"""Restoring a job from its snapshots when its workers start: the newest step every rank can
restore, from the node's shared-memory slots (with snapshot parity, after rebuilding the slots of
a lost node from the other nodes' data and parity: parity_exchange.py), else the newest good
persisted snapshot.

The ranks agree on the step in two exchanges: each rank lists the steps of the slots it can read
(its own, and rank 0's when it needs them: stage 0 keeps every parameter on rank 0, and frozen
parameters are saved by rank 0; at stage 1 and 2 every rank's on this node), up to their index:
a torn slot (a writer killed mid-copy) is not listed. Then, newest common step first, each rank
restores that step, checking the tensor checksums of its own slot only; the slots of other ranks
that it reads (the parameters they own, instead of a broadcast) are the same files, checked by
their own ranks, and the ranks agree on the outcome.
  - The newest step is checked while it is copied (SlotReader.read_into): each byte leaves memory
    once. A step that fails anywhere has then partly overwritten the state: the next older common
    step is restored over it, and without one that restores, the persisted checkpoints; with
    neither, the job stops (PartialRestoreError) instead of training on a mix of two states.
  - The oldest common step, and any restore followed by a broadcast (stage 3, or slots of other
    nodes), is checked before any state changes: a step that fails is dropped untouched.
Without a common step in memory (the whole node was restarted, or the world size changed), the
persisted checkpoints are tried newest first; one that fails its checksums is skipped with a
warning.
"""

import logging
import os
import time

import torch.distributed as dist

from memfit.checkpointing import agent, identity
from memfit.checkpointing.disk import DEFAULT_TAG_PREFIX, load_checkpoint, read_manifest
from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.parity import parity_problems
from memfit.checkpointing.parity_exchange import ParityGroups, plan_restore, rebuild_member, usable_parity
from memfit.checkpointing.slots import (
    SLOTS_PER_RANK,
    SlotDataError,
    SlotFile,
    SlotReader,
    SlotSource,
    align_to,
    newest_committed,
    slot_path,
)
from memfit.checkpointing.state import restore_rank_state

logger = logging.getLogger("memfit")


def _listed_slots(
    engine, shm_dir: str, rank: int, mismatches: list | None = None, log: bool = True
) -> dict[int, SlotReader]:
    """The committed slots of rank that this job may restore, by step, checked up to their index
    (their tensors are not); every slot left out is logged with the reason, and those of another
    configuration are also added to mismatches."""
    steps, problems = {}, []
    for reader in newest_committed(shm_dir, rank, problems):
        if reader.index["world_size"] != engine.world_size:
            saved_world = reader.index["world_size"]
            problems.append(f"{reader.path}: saved by {saved_world} rank(s), this job has {engine.world_size}")
            continue
        if (mismatch := _mismatch(engine, reader, shm_dir)) is not None:
            problems.append(mismatch)
            if mismatches is not None:
                mismatches.append(mismatch)
            continue
        steps.setdefault(reader.step, reader)
    for problem in problems if log else ():
        logger.warning("snapshot slot skipped: %s", problem)
    return steps


def _verified(readers: list[SlotReader]) -> str | None:
    """Checks the tensors of readers; the first problem (logged), or None."""
    for reader in readers:
        try:
            reader.verify()
        except CheckpointError as error:
            logger.warning("snapshot slot skipped: %s", error)
            return str(error)
    return None


def _readable_steps(engine, shm_dir: str, rank: int) -> dict[int, SlotReader]:
    """The listed slots of rank whose tensors all match their checksums, by step."""
    listed = _listed_slots(engine, shm_dir, rank)
    return {step: reader for step, reader in listed.items() if _verified([reader]) is None}


def _mismatch(engine, reader: SlotReader, shm_dir: str) -> str | None:
    """Why this job must not restore the slot (another configuration), or None. A slot of another
    job with the same fingerprint is a relaunch's (keep_shm): it is restored."""
    saved = reader.index.get("fingerprint")
    if saved is None or engine.fingerprint is None:
        return None
    found = identity.differences(saved, engine.fingerprint)
    if not found or identity.forced():
        return None
    return (
        f"{reader.path}: the snapshot of step {reader.step} (job {reader.index.get('job')}) does not match this job: "
        f"{'; '.join(found)}. To start fresh remove {shm_dir} (or use another snapshot.shm_dir); to restore it "
        f"anyway set {identity.FORCE_ENV}=1"
    )


def _gather(engine, value) -> list:
    if engine.world_size == 1:
        return [value]
    values = [None] * engine.world_size
    dist.all_gather_object(values, value)
    return values


class PartialRestoreError(CheckpointError):
    """A snapshot failed its checksums while being copied into the state, and no older snapshot in
    memory could be restored over it: the state is neither the fresh one nor a snapshot's."""


def restore_from_memory(engine, shm_dir: str, groups: ParityGroups | None = None) -> tuple[int, int] | None:
    """(step, slot of this rank) restored from shared memory, or None when no step is common (or,
    with parity groups, none is rebuildable either). PartialRestoreError when a snapshot that
    failed its checksums while being copied was left in the state (restore_latest then needs
    another tier)."""
    needs_rank0 = engine.stage == 0 or any(not p.requires_grad for p in engine.module.parameters())
    needed = sorted({engine.rank, 0} if needs_rank0 else {engine.rank})
    if groups is not None:
        return _restore_with_parity(engine, shm_dir, groups, needed)
    mismatches = []
    listed = {rank: _listed_slots(engine, shm_dir, rank, mismatches) for rank in needed}
    local_steps = set.intersection(*(set(steps) for steps in listed.values()))
    # stage 1 and 2 also read every other rank's slot on this node, for the parameters those ranks
    # own (instead of a broadcast after the restore); stage 3 gathers its parameters as it runs
    if engine.stage in (1, 2) and engine.world_size > 1:
        for rank in set(range(engine.world_size)) - set(needed):
            listed[rank] = _listed_slots(engine, shm_dir, rank, log=False)
    sequences = {
        step: {rank: steps[step].sequence for rank, steps in listed.items() if step in steps} for step in local_steps
    }
    reports = _gather(engine, (sorted(local_steps), mismatches[:1], sequences))
    common = set.intersection(*(set(steps) for steps, _, _ in reports))
    if not common:
        refused = [mismatch for _, found, _ in reports for mismatch in found]
        if refused:  # the snapshot there is another configuration's: starting fresh would hide it
            raise CheckpointError(refused[0])
        return None
    failed_while_copied = None  # the step whose failed restore the state may still hold
    for step in sorted(common, reverse=True):
        if not _same_files(step, reports):
            continue
        every_rank = _read_everywhere(engine, step, reports)
        readers = {rank: listed[rank][step] for rank in (range(engine.world_size) if every_rank else needed)}
        # with a broadcast after the copy, every rank must check its slot first: a rank whose check
        # fails in the middle of the copy would leave the others waiting in the broadcast
        without_broadcast = every_rank or engine.stage == 0 or engine.world_size == 1
        # checking while copying reads each byte once; a failure is then repaired by restoring the
        # next older step over it, so the oldest step is always checked first
        check_as_read = without_broadcast and step != min(common)
        if not check_as_read and any(_gather(engine, _verified([readers[engine.rank]]))):
            continue
        source = SlotSource(readers, {engine.rank}, check_as_read, every_rank)
        if _restore_step(engine, step, readers, source, repairable=check_as_read):
            return step, int(readers[engine.rank].path[-1])
        failed_while_copied = step
    if failed_while_copied is not None:
        raise PartialRestoreError(
            f"the snapshot of step {failed_while_copied} in {shm_dir} failed its checksums while it was being "
            "restored, and no older snapshot in memory could be restored over it"
        )
    return None


def _same_files(step: int, reports: list) -> bool:
    """Whether each rank lists, for step, the same slot (the same sequence) of every rank as that
    rank itself, which checks it."""
    return all(
        sequence == reports[rank][2][step].get(rank)
        for _, _, sequences in reports
        for rank, sequence in sequences[step].items()
    )


def _read_everywhere(engine, step: int, reports: list) -> bool:
    """Whether every rank holds the slot of every rank for step (one node, stage 1 or 2)."""
    if engine.stage not in (1, 2) or engine.world_size == 1:
        return False
    return all(len(sequences[step]) == engine.world_size for _, _, sequences in reports)


def _restore_step(engine, step: int, readers: dict[int, SlotReader], source=None, repairable=False) -> bool:
    """Restores `step` from the slots of the needed ranks, on every rank at once; True when it was
    restored. Each rank checks its own slot (before, or with repairable, while it copies). A
    checksum mismatch anywhere in a repairable restore returns False (logged), the state partly
    overwritten; any other failure raises CheckpointError on every rank."""
    if source is None:
        source = SlotSource(readers)
    error = None
    try:
        engine.client_state = restore_rank_state(engine, source)
    except SlotDataError as failure:
        error = ("checksum", str(failure))
        logger.warning("snapshot slot skipped: %s", failure)
    except CheckpointError as failure:
        error = ("other", str(failure))
    failures = [found for found in _gather(engine, error) if found]
    if failures and (not repairable or any(kind != "checksum" for kind, _ in failures)):
        message = next(message for kind, message in failures if kind != "checksum" or not repairable)
        raise CheckpointError(f"restoring the snapshot of step {step} failed: {message}")
    if failures and engine.rank == 0:
        logger.warning(
            "snapshot of step %d: a checksum failed while it was being restored (%s); restoring an older step over it",
            step,
            failures[0][1],
        )
    return not failures


def _restore_with_parity(engine, shm_dir: str, groups: ParityGroups, needed: list[int]) -> tuple[int, int] | None:
    """The newest step every rank holds, or that parity rebuilds for the ranks that lost it."""
    own = _readable_steps(engine, shm_dir, engine.rank)
    for problem in parity_problems(shm_dir, engine.rank):
        logger.warning("snapshot parity skipped: %s", problem)
    parity = usable_parity(shm_dir, engine.rank, groups.members, {step: r.data() for step, r in own.items()})
    report = {"local": sorted(own), "parity": {step: metadata for step, (metadata, _) in parity.items()}}
    reports = _gather(engine, report)
    step, lost, why_not_newer = plan_restore(reports, groups.members_of)
    if step is None:
        if engine.rank == 0 and any(report["local"] for report in reports):
            logger.warning("snapshot parity: no snapshot in memory can be restored (%s)", why_not_newer)
        return None
    if lost:
        if engine.rank == 0:
            logger.info(
                "snapshot parity: rebuilding rank(s) %s from the parity of step %d%s",
                sorted(lost),
                step,
                f" (newer steps cannot be restored: {why_not_newer})" if why_not_newer else "",
            )
        if not _rebuild(engine, shm_dir, groups, lost, reports, step, own, parity):
            return None
    if 0 in needed and engine.rank // groups.local_world_size != 0:
        problem = "rank 0's slot, which this rank needs (ZeRO stage 0 or frozen parameters), is on another node"
    else:
        problem = None
    problems = [message for message in _gather(engine, problem) if message]
    if problems:
        if engine.rank == 0:
            logger.warning("snapshot parity: not restoring from memory: %s", problems[0])
        return None
    readers = {}
    for rank in needed:
        held = own.get(step) if rank == engine.rank else None  # a rebuilt slot is in own too
        readers[rank] = held if held is not None else _slot_of_step(engine, shm_dir, rank, step)
    missing = [rank for rank, reader in readers.items() if reader is None]
    problem = f"no verified slot of step {step} for rank(s) {missing} in {shm_dir}" if missing else None
    failures = [message for message in _gather(engine, problem) if message]
    if failures:
        raise CheckpointError(f"restoring the snapshot of step {step} failed: {failures[0]}")
    _restore_step(engine, step, readers)
    return step, int(readers[engine.rank].path[-1])


def _slot_of_step(engine, shm_dir: str, rank: int, step: int) -> SlotReader | None:
    """The verified slot of rank holding step, or None."""
    reader = _listed_slots(engine, shm_dir, rank, log=False).get(step)
    return reader if reader is not None and _verified([reader]) is None else None


def _rebuild(engine, shm_dir, groups, lost, reports, step, own, parity) -> bool:
    """Rebuilds the lost ranks' slots of `step` (a rebuilt slot joins own, verified); False
    (logged) when a rebuild failed anywhere."""
    started = time.perf_counter()
    error = None
    try:
        local = {} if engine.rank in lost else {"data": own[step].data(), "parity": parity[step][1].parity}
        rebuilt = rebuild_member(groups, lost, reports, step, local)
        if rebuilt is not None:
            own[step] = write_rebuilt_slot(shm_dir, engine.rank, rebuilt)
    except (CheckpointError, OSError) as failure:
        error = f"rank {engine.rank}: {failure}"
    failures = [message for message in _gather(engine, error) if message]
    if failures:
        if engine.rank == 0:
            logger.warning("snapshot parity: rebuilding step %d failed (%s)", step, failures[0])
        return False
    if engine.rank == 0:
        logger.info("snapshot parity: rebuilt step %d in %.2f s", step, time.perf_counter() - started)
    return True


def write_rebuilt_slot(shm_dir: str, rank: int, data) -> SlotReader:
    """Writes a rebuilt slot into the rank's slot without a committed snapshot (else its older
    one); returns it, verified."""
    agent.request(shm_dir, {"op": "allocate", "rank": rank, "bytes": align_to(data.numel(), 1 << 20)})
    held = {int(reader.path[-1]): reader.sequence for reader in newest_committed(shm_dir, rank)}
    slot = min(range(SLOTS_PER_RANK), key=lambda candidate: held.get(candidate, 0))
    slot_file = SlotFile(slot_path(shm_dir, rank, slot))
    try:
        slot_file.write_committed(data)
    finally:
        slot_file.close()
    reader = SlotReader(slot_file.path)
    reader.verify()
    return reader


def persisted_tags(persist_path: str) -> list[str]:
    """Tags of complete persisted snapshots, newest step first."""
    if not os.path.isdir(persist_path):
        return []
    found = []
    for name in os.listdir(persist_path):
        if name.startswith(DEFAULT_TAG_PREFIX):
            try:
                manifest = read_manifest(os.path.join(persist_path, name))
            except CheckpointError as error:
                logger.warning("persisted snapshot %s skipped: %s", name, error)
                continue
            found.append((manifest["global_step"], name))
    return [name for _, name in sorted(found, reverse=True)]


def restore_from_disk(engine, persist_path: str) -> int | None:
    for tag in persisted_tags(persist_path):
        manifest = read_manifest(os.path.join(persist_path, tag), quiet=True) or {}
        found = []
        if manifest.get("fingerprint") is not None and engine.fingerprint is not None:
            found = identity.differences(manifest["fingerprint"], engine.fingerprint)
        if found and not identity.forced():
            raise CheckpointError(
                f"{os.path.join(persist_path, tag)}: the persisted snapshot of step {manifest['global_step']} "
                f"(job {manifest.get('job')}) does not match this job: {'; '.join(found)}. To start fresh remove "
                f"{persist_path} (or change snapshot.persist.path); to restore it anyway set {identity.FORCE_ENV}=1"
            )
        try:
            engine.client_state = load_checkpoint(engine, persist_path, tag)
        except CheckpointError as error:
            logger.warning("persisted snapshot %s skipped: %s", tag, error)
            continue
        return engine.global_step
    return None


def restore_latest(engine, snapshotter) -> int | None:
    """Restores the newest snapshot every rank can restore; returns its step, or None."""
    persist_path = snapshotter.config.persist.path
    try:
        restored = restore_from_memory(engine, snapshotter.shm_dir, snapshotter.parity_groups)
    except PartialRestoreError as error:
        if not persist_path:  # starting fresh would train on the half-restored state
            raise CheckpointError(f"{error}; no persisted snapshot is configured: the job cannot resume") from None
        logger.warning("%s; trying the persisted snapshots", error)
        if restore_from_disk(engine, persist_path) is None:
            raise CheckpointError(f"{error}, nor any persisted snapshot: the job cannot resume") from None
        restored = (engine.global_step, None)
        where = f"disk ({persist_path})"
    else:
        where = f"shared memory ({snapshotter.shm_dir})"
    if restored is not None:
        step, slot = restored
    else:
        step, slot = (restore_from_disk(engine, persist_path) if persist_path else None), None
        where = f"disk ({persist_path})"
    if step is None:
        return None
    snapshotter.restored(slot, step)
    engine.restored_from = step
    if engine.rank == 0:
        logger.info("restored the snapshot of step %d from %s", step, where)
    return step
