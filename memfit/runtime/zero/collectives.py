"""Bucketed gradient reduction and parameter synchronisation over torch.distributed.

A bucket's gradients are flattened into one buffer, reduced with a single asynchronous call, and
copied back once the call completes. Stage 0 and 1 all-reduce; stage 2 reduces to the owner and
the other ranks drop the gradient."""

import torch
import torch.distributed as dist

from memfit.runtime.zero.buckets import Bucket


class PendingReduce:
    def __init__(self, bucket: Bucket, flat: torch.Tensor, work, keep_grads: bool):
        self.bucket, self.flat, self.work, self.keep_grads = bucket, flat, work, keep_grads

    def finish(self, world_size: int) -> None:
        if self.work is not None:
            self.work.wait()
        if not self.keep_grads:
            for param in self.bucket.params:
                param.grad = None  # stage 2, not the owner: this rank never needs the gradient
            return
        self.flat.div_(world_size)
        offset = 0
        for param in self.bucket.params:
            count = param.numel()
            param.grad.copy_(self.flat[offset : offset + count].view_as(param.grad))
            offset += count


def start_reduce(bucket: Bucket, stage: int, rank: int, world_size: int) -> PendingReduce:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
    for param, grad in zip(bucket.params, grads):
        if param.grad is None:
            param.grad = grad  # a parameter unused this step still takes part, with zeros
    flat = torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else grads[0].reshape(-1).clone()
    if world_size == 1:
        return PendingReduce(bucket, flat, None, True)
    if stage == 2:
        work = dist.reduce(flat, dst=bucket.owner_rank, async_op=True)
        return PendingReduce(bucket, flat, work, keep_grads=rank == bucket.owner_rank)
    work = dist.all_reduce(flat, async_op=True)
    return PendingReduce(bucket, flat, work, keep_grads=True)


def broadcast_params(buckets: list[Bucket], rank: int) -> None:
    """Every rank receives each owner's updated parameters (one broadcast per bucket)."""
    pending = []
    for bucket in buckets:
        if len(bucket.params) == 1:
            flat = bucket.params[0].data.view(-1)  # in place, no copy
        else:
            flat = torch.cat([p.data.reshape(-1) for p in bucket.params])
        pending.append((bucket, flat, dist.broadcast(flat, src=bucket.owner_rank, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        if len(bucket.params) > 1 and rank != bucket.owner_rank:
            offset = 0
            for param in bucket.params:
                count = param.numel()
                param.data.copy_(flat[offset : offset + count].view_as(param))
                offset += count


def all_reduce_scalar(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(value)
    return value
