"""Which rank owns which parameter: whole tensors, greedy balanced bin-packing by size.

Largest tensors first (ties by model order), each to the least-loaded rank (ties to the lowest
rank). Deterministic for a given model and world size, so every rank computes the same plan
without communicating, and a checkpoint can be re-planned for another world size."""

from dataclasses import dataclass, field

import torch


@dataclass
class OwnershipPlan:
    world_size: int
    names: list[str]  # model order
    owner_of: dict[str, int]
    numel_of: dict[str, int]
    load_per_rank: list[int] = field(default_factory=list)  # elements owned by each rank

    def owned(self, rank: int) -> list[str]:
        """Names owned by rank, in model order."""
        return [name for name in self.names if self.owner_of[name] == rank]

    def summary(self) -> dict:
        return {
            "world_size": self.world_size,
            "elements_per_rank": list(self.load_per_rank),
            "owner_of": dict(self.owner_of),
        }


def plan_ownership(named_params: list[tuple[str, torch.Tensor]], world_size: int) -> OwnershipPlan:
    numel_of = {name: p.numel() for name, p in named_params}
    names = [name for name, _ in named_params]
    order = sorted(range(len(names)), key=lambda i: (-numel_of[names[i]], i))
    load = [0] * world_size
    owner_of = {}
    for index in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner_of[names[index]] = rank
        load[rank] += numel_of[names[index]]
    return OwnershipPlan(world_size, names, owner_of, numel_of, load)
