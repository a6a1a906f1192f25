"""Parity rounds and rebuilds over gloo: the workers of a parity group (the ranks with the same
local rank on every node) exchange parts of their committed slots and XOR them (point to point in
a round, each byte sent once; gloo's BXOR on int64 words in a rebuild; NCCL has no bitwise
reduction), and after the loss of a node rebuild the lost member's slot from the survivors' data
and parity. See parity.py for the layout.

A parity round runs on a worker's background thread, from the host copy in the slot (no GPU
work), on a gloo group of its own that training never uses. It writes into the parity slot that
does not hold the last complete round, and the round is complete only once every member has
committed its parity (a last all-reduce): an interrupted round leaves the previous one usable.
The data slot of the last complete round is kept (the snapshotter writes new snapshots into the
other slot), so that round stays rebuildable until the next one completes.

Restore (plan_restore): a step is restorable when, in every group, every member holds a verified
slot of it, or all but one do and every survivor holds verified parity of that step made from
exactly the bytes it holds now (the data digests in the parity metadata). The newest such step
wins; all ranks compute the same plan from one all-gather.
"""

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
import xxhash

from memfit.checkpointing import agent
from memfit.checkpointing.faults import fault_point
from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.parity import (
    PARITY_SLOTS_PER_RANK,
    ParityFile,
    committed_parity,
    data_part,
    parity_path,
    part_bytes_for,
    part_index,
    slot_file_bytes,
)

logger = logging.getLogger("memfit")

GROUP_TIMEOUT = timedelta(minutes=10)


class ParityGroups:
    """The parity groups of a job: group g holds ranks g, g + L, g + 2L, ... (L ranks per node),
    one gloo group each. Every rank must build it, in the same order (dist.new_group)."""

    def __init__(self, world_size: int, local_world_size: int, rank: int):
        self.rank = rank
        self.local_world_size = local_world_size
        self.num_nodes = world_size // local_world_size
        self.members_of = [
            [node * local_world_size + local for node in range(self.num_nodes)] for local in range(local_world_size)
        ]
        self.members = self.members_of[rank % local_world_size]
        self.member = self.members.index(rank)
        self.group = None
        for members in self.members_of:
            group = dist.new_group(members, backend="gloo", timeout=GROUP_TIMEOUT)
            if rank in members:
                self.group = group

    def group_of(self, rank: int) -> list[int]:
        return self.members_of[rank % self.local_world_size]


def _int64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int64)


class ParityRounds:
    """One rank's parity rounds: the slot files it writes, and its sequence numbers."""

    def __init__(self, groups: ParityGroups, shm_dir: str, world_size: int):
        self.groups = groups
        self.shm_dir = shm_dir
        self.world_size = world_size
        committed = committed_parity(shm_dir, groups.rank)
        self.sequence = max((reader.sequence for reader in committed), default=0)
        newest = int(committed[0].path[-1]) if committed else PARITY_SLOTS_PER_RANK - 1
        self.next_slot = (newest + 1) % PARITY_SLOTS_PER_RANK
        self.newest_step = committed[0].step if committed else None
        self._files: list[ParityFile | None] = [None] * PARITY_SLOTS_PER_RANK
        self.last_sent_bytes = 0  # bytes this rank sent in its last round

    def _file(self, slot: int, num_bytes: int) -> ParityFile:
        current = self._files[slot]
        if current is not None and current.num_bytes >= num_bytes:
            return current
        agent.request(self.shm_dir, {"op": "allocate", "rank": self.groups.rank, "bytes": num_bytes, "kind": "parity"})
        if current is not None:
            current.close()
        self._files[slot] = ParityFile(parity_path(self.shm_dir, self.groups.rank, slot))
        return self._files[slot]

    def run(self, data: torch.Tensor, step: int) -> None:
        """One round for the committed slot bytes `data` (uint8) of `step`; returns once every
        member has committed its parity. Raises CheckpointError if the members disagree."""
        group, groups = self.groups.group, self.groups
        num_members = len(groups.members)
        digest = xxhash.xxh3_64_hexdigest(data.numpy())
        infos = [None] * num_members
        dist.all_gather_object(infos, (step, data.numel(), digest), group=group)
        if any(info[0] != step for info in infos):
            raise CheckpointError(f"parity round of step {step}: members hold steps {[info[0] for info in infos]}")
        part_bytes = part_bytes_for([info[1] for info in infos])
        slot = self.next_slot
        parity_file = self._file(slot, slot_file_bytes(part_bytes))
        parity_file.invalidate()
        self._exchange(data, part_bytes, parity_file.parity(part_bytes))
        fault_point("parity-exchanged", groups.rank)
        self.sequence += 1
        metadata = {
            "step": step,
            "world_size": self.world_size,
            "group": groups.members,
            "member": groups.member,
            "part_bytes": part_bytes,
            "data_bytes": [info[1] for info in infos],
            "data_digests": [info[2] for info in infos],
        }
        parity_file.commit(step, self.sequence, metadata)
        done = torch.ones(1, dtype=torch.int64)
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=group)  # everyone committed: the round is complete
        self.next_slot = (slot + 1) % PARITY_SLOTS_PER_RANK
        self.newest_step = step
        self.last_sent_bytes = (num_members - 1) * part_bytes

    def _exchange(self, data: torch.Tensor, part_bytes: int, parity: torch.Tensor) -> None:
        """Sends each other member the part of data its parity covers, and XORs the parts the
        others send into parity: a reduce-scatter with BXOR, each byte sent once (gloo's
        reduce-scatter passes every input through an all-reduce, three times the bytes and time)."""
        groups = self.groups
        num_members = len(groups.members)
        others = [holder for holder in range(num_members) if holder != groups.member]
        received = [parity] + [torch.empty_like(parity) for _ in others[1:]]
        works = []
        for holder, into in zip(others, received):
            part = data_part(data, part_index(groups.member, holder, num_members), part_bytes)
            works.append(dist.isend(part, groups.members[holder], group=groups.group))
            works.append(dist.irecv(into, groups.members[holder], group=groups.group))
        for work in works:
            work.wait()
        for extra in received[1:]:
            _int64(parity).bitwise_xor_(_int64(extra))

    def close(self) -> None:
        for parity_file in self._files:
            if parity_file is not None:
                parity_file.close()
        self._files = [None] * PARITY_SLOTS_PER_RANK


# ---- restore ------------------------------------------------------------------------------------
def usable_parity(shm_dir: str, rank: int, group: list[int], data_of_step: dict[int, torch.Tensor]) -> dict:
    """{step: ((part_bytes, data_bytes, data_digests), ParityReader)} for the rank's verified parity
    slots of its current group made from exactly the bytes it holds now for that step (data_of_step:
    step -> slot bytes)."""
    usable = {}
    for reader in committed_parity(shm_dir, rank):
        metadata = reader.metadata
        data = data_of_step.get(reader.step)
        if data is None or metadata["group"] != group or reader.step in usable:
            continue  # no data of that step, or parity of another layout of the job
        if metadata["data_digests"][metadata["member"]] != xxhash.xxh3_64_hexdigest(data.numpy()):
            continue  # parity of another snapshot of that step
        usable[reader.step] = ((metadata["part_bytes"], metadata["data_bytes"], metadata["data_digests"]), reader)
    return usable


def plan_restore(reports: list[dict], groups: list[list[int]]) -> tuple[int | None, dict[int, int], str]:
    """(step, {lost rank: holder-of-metadata rank}, why not newer) from every rank's report
    {"local": [steps], "parity": {step: metadata}}; step None when nothing is restorable."""
    candidates = sorted({step for report in reports for step in report["local"]}, reverse=True)
    reasons = []
    for step in candidates:
        lost, problem = {}, None
        for members in groups:
            missing = [rank for rank in members if step not in reports[rank]["local"]]
            if not missing:
                continue
            if len(missing) > 1:
                problem = (
                    f"step {step}: ranks {missing} of parity group {members} have no snapshot of it; "
                    "XOR parity rebuilds one lost member per group"
                )
                break
            survivors = [rank for rank in members if rank != missing[0]]
            without = [rank for rank in survivors if step not in reports[rank]["parity"]]
            if without:
                problem = f"step {step}: rank {missing[0]} is lost and ranks {without} hold no usable parity of it"
                break
            if len({repr(reports[rank]["parity"][step]) for rank in survivors}) > 1:
                problem = f"step {step}: the parity metadata of ranks {survivors} disagree"
                break
            lost[missing[0]] = survivors[0]
        if problem is None:
            return step, lost, "; ".join(reasons)
        reasons.append(problem)
    return None, {}, "; ".join(reasons) if reasons else "no rank holds a snapshot"


def rebuild_member(groups: ParityGroups, lost: dict[int, int], reports: list[dict], step: int, local: dict):
    """Runs this rank's part of the rebuild of step `step`. local: {"data": slot bytes of step,
    "parity": its parity tensor} on a survivor. Returns the lost member's bytes on the lost rank,
    verified against the digest the round recorded, else None. Raises CheckpointError."""
    members = groups.members
    lost_rank = next((rank for rank in lost if rank in members), None)
    if lost_rank is None:
        return None
    part_bytes, data_bytes, data_digests = reports[lost[lost_rank]]["parity"][step]
    num_members = len(members)
    lost_member = members.index(lost_rank)
    me = groups.member
    holders = [holder for holder in range(num_members) if holder != lost_member]
    if me != lost_member:  # for each part: the holder sends its parity, the others their data part
        works = []
        for holder in holders:
            if holder == me:
                contribution = local["parity"]
            else:
                contribution = data_part(local["data"], part_index(me, holder, num_members), part_bytes)
            works.append(dist.isend(contribution, lost_rank, group=groups.group, tag=holder))
        for work in works:
            work.wait()
        return None
    # part covered by holder h = h's parity XOR the other survivors' data parts covered by h
    rebuilt = torch.empty((num_members - 1) * part_bytes, dtype=torch.uint8)
    received, works = [], []
    for holder in holders:
        part = part_index(lost_member, holder, num_members)
        into = rebuilt[part * part_bytes : (part + 1) * part_bytes]
        for number, sender in enumerate(holders):
            buffer = into if number == 0 else torch.empty(part_bytes, dtype=torch.uint8)
            works.append(dist.irecv(buffer, members[sender], group=groups.group, tag=holder))
            received.append((into, buffer))
    for work in works:
        work.wait()
    for into, buffer in received:
        if buffer is not into:
            _int64(into).bitwise_xor_(_int64(buffer))
    rebuilt = rebuilt[: data_bytes[lost_member]]
    if xxhash.xxh3_64_hexdigest(rebuilt.numpy()) != data_digests[lost_member]:
        raise CheckpointError(f"rank {lost_rank}: the slot rebuilt from parity of step {step} fails its checksum")
    return rebuilt
