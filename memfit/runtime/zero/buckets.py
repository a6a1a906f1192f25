"""Owner-major gradient buckets: parameters sorted by owner, then model order, packed into buckets
of at most reduce_bucket_size elements that never span two owners, so a stage-2 bucket is one
reduce to one destination. A tensor larger than the bucket size gets a bucket of its own."""

from dataclasses import dataclass

import torch


@dataclass
class Bucket:
    owner_rank: int
    params: list[torch.nn.Parameter]
    names: list[str]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def build_buckets(named_params, plan, bucket_numel: int) -> list[Bucket]:
    by_name = dict(named_params)
    buckets: list[Bucket] = []
    for owner_rank in range(plan.world_size):
        current = None
        for name in plan.owned(owner_rank):
            param = by_name[name]
            if current is None or current.numel + param.numel() > bucket_numel:
                current = Bucket(owner_rank, [], [])
                buckets.append(current)
            current.params.append(param)
            current.names.append(name)
    return buckets
