"""deepspeed.comm, the calls training scripts make, over torch.distributed. In a single process
that joined no group (a script run without a launcher) they answer as rank 0 of 1 and the
collectives leave tensors as they are, which is what one rank's reduction gives."""

import os

import torch.distributed as dist

from memfit.runtime.distributed import init_distributed as _init_distributed

ReduceOp = dist.ReduceOp


def init_distributed(dist_backend=None, auto_mpi_discovery=True, distributed_port=None, verbose=True, **kwargs):
    if dist_backend not in (None, "gloo", "nccl"):
        raise ValueError(f"dist_backend: memfit runs on gloo or nccl, got {dist_backend!r}")
    _init_distributed()


def is_initialized() -> bool:
    return dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier(group=None, async_op=False):
    if dist.is_initialized():
        return dist.barrier(group=group, async_op=async_op)
    return None


def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
    if dist.is_initialized():
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)
    return None


def broadcast(tensor, src, group=None, async_op=False):
    if dist.is_initialized():
        return dist.broadcast(tensor, src, group=group, async_op=async_op)
    return None


def all_gather(tensor_list, tensor, group=None, async_op=False):
    if dist.is_initialized():
        return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    tensor_list[0].copy_(tensor)
    return None
