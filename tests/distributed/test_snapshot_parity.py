"""Parity rounds over gloo between real processes, each "node" with its own agent and shared-memory
directory: the parity each member stores equals the single-process reference, a second round
leaves the first one readable, and the lost member of each group is rebuilt bit for bit from the
survivors' data and parity."""

import os
import tempfile

import pytest
import torch

from memfit.checkpointing import agent
from memfit.checkpointing.parity import committed_parity, encode
from memfit.checkpointing.parity_exchange import ParityGroups, ParityRounds, rebuild_member
from tests.distributed.harness import run_ranks

LENGTHS = [5000, 1, 4099, 0]


def member_data(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank * 1000 + step)
    return torch.randint(0, 256, (LENGTHS[rank],), dtype=torch.uint8, generator=generator)


def _exchange(rank, world_size, local_world_size, directory, lost_node):
    shm_dir = os.path.join(directory, f"node{rank // local_world_size}")
    agent.ensure_agent(shm_dir, os.getpid())
    groups = ParityGroups(world_size, local_world_size, rank)
    rounds = ParityRounds(groups, shm_dir, world_size)
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
    "world_size, local_world_size, lost_node",
    [(3, 1, 1), (2, 1, 0), pytest.param(4, 2, 1, marks=pytest.mark.slow)],
)
def test_round_and_rebuild(world_size, local_world_size, lost_node):
    with tempfile.TemporaryDirectory() as directory:
        sent = run_ranks(_exchange, world_size, local_world_size, directory, lost_node)
    num_nodes = world_size // local_world_size
    for rank, sent_bytes in enumerate(sent):
        group_lengths = [LENGTHS[m] for m in range(rank % local_world_size, world_size, local_world_size)]
        per_part = -(-max(group_lengths) // (num_nodes - 1))
        part = max(64, -(-per_part // 64) * 64)
        assert sent_bytes == (num_nodes - 1) * part
