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

What a round costs, and where it runs. Its CPU time is the kernel's copies of the sends and
receives (gloo's TCP loop thread), one XXH3 pass over the data and one over the parity, and with
three or more members the XORs. Parts move in chunks of CHUNK_BYTES: each chunk of parity is
XORed and hashed right after it arrives, while it is still in cache, and the second and later
members' chunks land in RECEIVE_DEPTH chunk buffers kept across rounds (no allocation, no page
faults per round). The round runs at a lower priority than training (snapshot.parity_nice): the
parity thread lowers its own nice value, and the group's gloo threads (its TCP loop and run
loops) are created by a thread at that nice value, which they inherit, so on a machine without
spare cores training gets them first.

Restore (plan_restore): a step is restorable when, in every group, every member holds a verified
slot of it, or all but one do and every survivor holds verified parity of that step made from
exactly the bytes it holds now (the data digests in the parity metadata). The newest such step
wins; all ranks compute the same plan from one all-gather.
"""

import logging
import os
import sys
import threading
import warnings
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist
import xxhash

from memfit.checkpointing import agent
from memfit.checkpointing.faults import fault_point
from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.parity import (
    PARITY_SLOTS_PER_RANK,
    PART_ALIGN,
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
CHUNK_BYTES = 4 << 20  # a multiple of PART_ALIGN; a chunk stays in L2/L3 between its arrival, XOR and hash
RECEIVE_DEPTH = 4  # chunks of the second and later members' parts in flight at once
MAX_NICE = 19


def lower_thread_priority(increment: int) -> bool:
    """Adds increment to the calling thread's nice value (at most 19), not the process's: on Linux
    the nice value is per thread, and threads the calling thread starts later inherit it. Returns
    False, with a warning, where that is not so (setpriority would lower the whole process)."""
    if increment <= 0:
        return True
    if not sys.platform.startswith("linux"):
        warnings.warn(
            f"snapshot.parity_nice {increment} is ignored on {sys.platform}: only Linux sets a nice value per thread",
            stacklevel=2,
        )
        return False
    thread_id = threading.get_native_id()
    current = os.getpriority(os.PRIO_PROCESS, thread_id)
    os.setpriority(os.PRIO_PROCESS, thread_id, min(MAX_NICE, current + increment))
    return True


def _on_thread_at_lower_priority(increment: int, action):
    """action() on a new thread whose nice value is increment above this one's: the threads that
    action starts (gloo's, for a new group) keep that nice value for their whole life."""
    outcome = {}

    def run() -> None:
        try:
            lower_thread_priority(increment)
            outcome["value"] = action()
        except BaseException as error:  # raised again on the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="memfit-parity-setup")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class ParityGroups:
    """The parity groups of a job: group g holds ranks g, g + L, g + 2L, ... (L ranks per node),
    one gloo group each. Every rank must build it, in the same order (dist.new_group). nice: how
    much lower than the caller's the priority of the groups' gloo threads is."""

    def __init__(self, world_size: int, local_world_size: int, rank: int, nice: int = 0):
        self.rank = rank
        self.local_world_size = local_world_size
        self.num_nodes = world_size // local_world_size
        self.members_of = [
            [node * local_world_size + local for node in range(self.num_nodes)] for local in range(local_world_size)
        ]
        self.members = self.members_of[rank % local_world_size]
        self.member = self.members.index(rank)
        self.group = _on_thread_at_lower_priority(nice, self._new_groups)

    def _new_groups(self):
        """Every rank creates every group, in the same order; returns this rank's."""
        own = None
        for members in self.members_of:
            group = dist.new_group(members, backend="gloo", timeout=GROUP_TIMEOUT)
            if self.rank in members:
                own = group
        return own

    def group_of(self, rank: int) -> list[int]:
        return self.members_of[rank % self.local_world_size]


def _int64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int64)


class ParityRounds:
    """One rank's parity rounds: the slot files it writes, its sequence numbers, and the chunk
    buffers its rounds receive into (kept from one round to the next)."""

    def __init__(self, groups: ParityGroups, shm_dir: str, world_size: int, chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes <= 0 or chunk_bytes % PART_ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {PART_ALIGN}, got {chunk_bytes}")
        self.groups = groups
        self.chunk_bytes = chunk_bytes
        self.shm_dir = shm_dir
        self.world_size = world_size
        committed = committed_parity(shm_dir, groups.rank)
        self.sequence = max((reader.sequence for reader in committed), default=0)
        newest = int(committed[0].path[-1]) if committed else PARITY_SLOTS_PER_RANK - 1
        self.next_slot = (newest + 1) % PARITY_SLOTS_PER_RANK
        self.newest_step = committed[0].step if committed else None
        self._files: list[ParityFile | None] = [None] * PARITY_SLOTS_PER_RANK
        self.last_sent_bytes = 0  # bytes this rank sent in its last round
        self._receive_buffers: list[torch.Tensor] = []  # RECEIVE_DEPTH x chunk_bytes (uint8), with 3+ members
        self._zeros: torch.Tensor | None = None  # what a part holds beyond the end of the data

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
        parity_digest = self._exchange(data, part_bytes, parity_file.parity(part_bytes))
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
        parity_file.commit(step, self.sequence, metadata, parity_digest)
        done = torch.ones(1, dtype=torch.int64)
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=group)  # everyone committed: the round is complete
        self.next_slot = (slot + 1) % PARITY_SLOTS_PER_RANK
        self.newest_step = step
        self.last_sent_bytes = (num_members - 1) * part_bytes

    def _exchange(self, data: torch.Tensor, part_bytes: int, parity: torch.Tensor) -> int:
        """Sends each other member the part of data its parity covers, and XORs the parts the
        others send into parity; returns the XXH3 digest of parity. A reduce-scatter with BXOR, each
        byte sent once (gloo's reduce-scatter passes every input through an all-reduce, three times
        the bytes and time), in chunks: chunk c of every part travels with tag c. The first other
        member's chunks land in parity itself; the later members' go through the chunk buffers,
        each XORed in as it arrives, and each chunk of parity is hashed once it is complete."""
        groups, group = self.groups, self.groups.group
        num_members = len(groups.members)
        holders = [holder for holder in range(num_members) if holder != groups.member]
        chunk_bytes = self.chunk_bytes
        bounds = [(start, min(start + chunk_bytes, part_bytes)) for start in range(0, part_bytes, chunk_bytes)]
        sends = []
        for holder in holders:
            part_start = part_index(groups.member, holder, num_members) * part_bytes
            for tag, (start, end) in enumerate(bounds):
                chunk = self._data_chunk(data, part_start + start, end - start)
                sends.append(dist.isend(chunk, groups.members[holder], group=group, tag=tag))
        first, *later = [groups.members[holder] for holder in holders]
        direct = [dist.irecv(parity[start:end], first, group=group, tag=tag) for tag, (start, end) in enumerate(bounds)]
        # (chunk, sender) in the order they are XORed; buffer i % depth serves the i-th
        to_receive = [(chunk, sender) for chunk in range(len(bounds)) for sender in later]
        buffers = self._buffers(min(RECEIVE_DEPTH, len(to_receive)))
        in_flight = deque()

        def post(number: int) -> None:
            chunk, sender = to_receive[number]
            start, end = bounds[chunk]
            buffer = buffers[number % len(buffers)][: end - start]
            in_flight.append((buffer, dist.irecv(buffer, sender, group=group, tag=chunk)))

        for number in range(len(buffers)):
            post(number)
        next_to_post = len(buffers)
        digest = xxhash.xxh3_64()
        for chunk, (start, end) in enumerate(bounds):
            direct[chunk].wait()
            into = parity[start:end]
            for _ in later:
                buffer, work = in_flight.popleft()
                work.wait()
                _int64(into).bitwise_xor_(_int64(buffer))
                if next_to_post < len(to_receive):  # the buffer just XORed takes the next chunk
                    post(next_to_post)
                    next_to_post += 1
            digest.update(into.numpy())
        for work in sends:
            work.wait()
        return digest.intdigest()

    def _data_chunk(self, data: torch.Tensor, start: int, num_bytes: int) -> torch.Tensor:
        """num_bytes of data from start, padded with zeros: a view where they lie inside the data."""
        end = start + num_bytes
        if end <= data.numel():
            return data[start:end]
        if start >= data.numel():
            if self._zeros is None or self._zeros.numel() < num_bytes:
                self._zeros = torch.zeros(self.chunk_bytes, dtype=torch.uint8)
            return self._zeros[:num_bytes]
        padded = torch.zeros(num_bytes, dtype=torch.uint8)
        padded[: data.numel() - start] = data[start:]
        return padded

    def _buffers(self, count: int) -> list[torch.Tensor]:
        while len(self._receive_buffers) < count:
            self._receive_buffers.append(torch.empty(self.chunk_bytes, dtype=torch.uint8))
        return self._receive_buffers[:count]

    def close(self) -> None:
        for parity_file in self._files:
            if parity_file is not None:
                parity_file.close()
        self._files = [None] * PARITY_SLOTS_PER_RANK
        self._receive_buffers, self._zeros = [], None


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
