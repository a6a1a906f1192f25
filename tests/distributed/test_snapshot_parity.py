"""Parity rounds over gloo between real processes, each "node" with its own agent and shared-memory
directory: the parity each member stores equals the single-process reference (in one chunk, and in
many chunks with a short last one, the chunk buffers reused), its checksum verifies, a second round
leaves the first one readable, the lost member of each group is rebuilt bit for bit from the
survivors' data and parity, and the parity group's gloo threads run at the lower priority asked
for while the caller's stays."""

import os
import tempfile

import pytest
import torch

from memfit.checkpointing import agent
from memfit.checkpointing.parity import committed_parity, encode
from memfit.checkpointing.parity_exchange import CHUNK_BYTES, ParityGroups, ParityRounds, rebuild_member
from tests.distributed.harness import run_ranks

LENGTHS = [5000, 1, 4099, 0]


def member_data(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank * 1000 + step)
    return torch.randint(0, 256, (LENGTHS[rank],), dtype=torch.uint8, generator=generator)


NICE = 3


def _thread_nice() -> dict[str, int]:
    """{thread id: nice value} of this process's threads."""
    nice = {}
    for thread_id in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{thread_id}/stat") as stat:
                nice[thread_id] = int(stat.read().rsplit(")", 1)[1].split()[16])
        except OSError:
            continue  # a thread that ended
    return nice


def _exchange(rank, world_size, local_world_size, directory, lost_node, chunk_bytes):
    shm_dir = os.path.join(directory, f"node{rank // local_world_size}")
    agent.ensure_agent(shm_dir, os.getpid())
    before = _thread_nice()
    groups = ParityGroups(world_size, local_world_size, rank, nice=NICE)
    started = {thread: nice for thread, nice in _thread_nice().items() if thread not in before}
    assert started and set(started.values()) == {NICE}, started  # gloo's threads of the parity group
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # the caller (training) keeps its priority
    rounds = ParityRounds(groups, shm_dir, world_size, chunk_bytes=chunk_bytes)
    for step in (4, 6):
        rounds.run(member_data(rank, step), step)
    newest, previous = committed_parity(shm_dir, rank)
    assert (newest.step, previous.step) == (6, 4)
    expected = encode([member_data(member, 6) for member in groups.members])[groups.member]
    assert torch.equal(newest.parity, expected)
    # the node `lost_node` loses everything: its ranks rebuild their data of step 6
    lost_ranks = [r for r in range(world_size) if r // local_world_size == lost_node]
    lost = {}
    for lost_rank in lost_ranks:
        group = groups.group_of(lost_rank)
        lost[lost_rank] = next(member for member in group if member != lost_rank)
    if rank in lost:
        rebuilt = rebuild_member(groups, lost, _group_reports(groups, rank, lost, newest), 6, {})
        assert torch.equal(rebuilt, member_data(rank, 6))
    else:
        local = {"data": member_data(rank, 6), "parity": newest.parity}
        assert rebuild_member(groups, lost, _group_reports(groups, rank, lost, newest), 6, local) is None
    rounds.close()
    return rounds.last_sent_bytes


def _group_reports(groups, rank, lost, newest):
    """Reports where each lost rank's metadata holder is a survivor of this rank's group, holding
    this rank's parity metadata (the same for the whole group)."""
    import torch.distributed as dist

    metadata = (newest.metadata["part_bytes"], newest.metadata["data_bytes"], newest.metadata["data_digests"])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if rank in lost else metadata)
    return [{"local": [], "parity": {6: value}} for value in gathered]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world_size, local_world_size, lost_node, chunk_bytes",
    # parts of 2560 (three nodes) and 5056 bytes (two): 20 chunks of 128, or 26 of 192 and one of 64
    [(3, 1, 1, 128), (2, 1, 0, CHUNK_BYTES), pytest.param(4, 2, 1, 192, marks=pytest.mark.slow)],
)
def test_round_and_rebuild(world_size, local_world_size, lost_node, chunk_bytes):
    with tempfile.TemporaryDirectory() as directory:
        sent = run_ranks(_exchange, world_size, local_world_size, directory, lost_node, chunk_bytes)
    num_nodes = world_size // local_world_size
    for rank, sent_bytes in enumerate(sent):
        group_lengths = [LENGTHS[m] for m in range(rank % local_world_size, world_size, local_world_size)]
        per_part = -(-max(group_lengths) // (num_nodes - 1))
        part = max(64, -(-per_part // 64) * 64)
        assert sent_bytes == (num_nodes - 1) * part
