"""Bucketed gradient reduction and parameter synchronisation over torch.distributed.

Gradients arrive pre-divided by the world size (the engine scales the loss), so a sum is the
mean. A bucket with a gradient buffer is reduced in place; a stage-2 bucket this rank does not
own has none: a single tensor is sent from its .grad, several are staged through one reusable
buffer, and the gradients are dropped once sent. Under the streamed step (streamed_step.py) an
owned bucket of streamed tensors has none either: the owner's contributions are reduced in a
buffer of the bucket's own, and each tensor's reduced gradient goes to the swap file when the
reduce completes."""

import torch
import torch.distributed as dist

from memfit.runtime.zero.buckets import Bucket

# Finished collectives are kept, the newest KEPT_NEWEST of them until the next step, and released
# here, on the main thread. A gloo worker thread drops its own reference to a collective just after
# signalling completion; were that the last one, the thread would release the tensors' Python
# objects, which needs the GIL, and a thread that asks for the GIL while the interpreter is
# finalizing exits inside a noexcept destructor: the process aborts ("terminate called without an
# active exception") after a training run that had finished. Older ones are let go as new ones
# complete (the exit handler's grace period, distributed.py, covers the threads' last moments): a
# work holds its tensors, a stage-3 gather's buffer or a bucket's gradients, and keeping every one
# until the step held a whole model of them on each rank.
KEPT_NEWEST = 4
_kept_works: list = []


def keep(work) -> None:
    _kept_works.append(work)
    if len(_kept_works) > KEPT_NEWEST:
        del _kept_works[0]


def release_kept_works() -> None:
    _kept_works.clear()


class PendingReduce:
    def __init__(self, bucket: Bucket, work, drop_grads: bool, flags=None, streamed=None, reduced=None):
        """flags: (work, tensor) of the reduce of which ranks gave each tensor a gradient (a bucket
        of streamed tensors); streamed, reduced: the owner's StreamedStep, which takes the reduced
        gradients, and the tensors (one per parameter) the reduce sums into."""
        self.bucket, self.work, self.drop_grads = bucket, work, drop_grads
        self.flags, self.streamed, self.reduced = flags, streamed, reduced
        self.done = False

    def finish(self) -> None:
        if self.done:
            return
        for work in (self.work, self.flags[0]) if self.flags is not None else (self.work,):
            work.wait()
            keep(work)
        self.done = True
        if self.drop_grads:
            for param in self.bucket.params:
                param.grad = None  # stage 2, not the owner: this rank never needs the gradient
        if self.streamed is not None:
            anywhere = self.flags[1].tolist()
            for param, grad, ranks in zip(self.bucket.params, self.reduced, anywhere):
                self.streamed.take_reduced(param, grad, got_grad_anywhere=ranks > 0)
            self.reduced = None

    def completed(self) -> bool:
        return self.done or (self.work.is_completed() and (self.flags is None or self.flags[0].is_completed()))


class GradientReducer:
    def __init__(self, stage: int, rank: int, staging_numel: int, group=None):
        """group: where the reduces run (None: the default group)."""
        self.stage, self.rank, self.group = stage, rank, group
        # on several ranks under the streamed step (set by the build): the StreamedStep, and
        # touched(param) -> whether this rank gave the tensor a gradient in the running backward
        self.streamed = None
        self.touched = None
        self._staging_numel = staging_numel
        self._staging: torch.Tensor | None = None
        self._staged: PendingReduce | None = None  # the reduce currently sending from staging

    def start(self, bucket: Bucket) -> PendingReduce:
        if self.streamed is not None and id(bucket.params[0]) in self.streamed.stage3.index_of:
            return self._start_streamed(bucket)
        return self._start_plain(bucket)

    def _start_plain(self, bucket: Bucket) -> PendingReduce:
        staged = False
        if bucket.grad_buffer is not None:
            flat = bucket.grad_buffer
        elif len(bucket.params) == 1:
            param = bucket.params[0]
            if param.grad is None:  # unused this step: still takes part, with zeros
                param.grad = torch.zeros(bucket.shapes[0], dtype=param.dtype, device=param.device)
            flat = param.grad.view(-1)
        else:
            flat, staged = self._stage(bucket), True
        if self.stage >= 2:
            work = dist.reduce(flat, dst=bucket.owner_rank, group=self.group, async_op=True)
            pending = PendingReduce(bucket, work, drop_grads=self.rank != bucket.owner_rank)
        else:
            pending = PendingReduce(bucket, dist.all_reduce(flat, group=self.group, async_op=True), drop_grads=False)
        if staged:
            self._staged = pending
        return pending

    def _start_streamed(self, bucket: Bucket) -> PendingReduce:
        """A bucket of streamed tensors. Its owner reduces in a buffer of its own (one tensor: in
        its contribution), freed once the gradients are written; every rank also sends which
        tensors it gave a gradient, so that the owner knows, when the reduce completes, which got
        none from any rank (as stage 2's has_grad), without waiting for backward to end."""
        flags = torch.tensor([self.touched(param) for param in bucket.params], dtype=torch.int32)
        if bucket.owner_rank != self.rank:
            pending = self._start_plain(bucket)
            pending.flags = (dist.reduce(flags, dst=bucket.owner_rank, group=self.group, async_op=True), flags)
            return pending
        contributions = [self.streamed.contribution(param) for param in bucket.params]
        if len(contributions) == 1:
            flat = contributions[0].view(-1)
            reduced = contributions
        else:
            flat = torch.cat([c.view(-1) for c in contributions])
            pieces = flat.split([c.numel() for c in contributions])
            reduced = [piece.view(c.shape) for piece, c in zip(pieces, contributions)]
        work = dist.reduce(flat, dst=self.rank, group=self.group, async_op=True)
        flag_work = dist.reduce(flags, dst=self.rank, group=self.group, async_op=True)
        return PendingReduce(bucket, work, False, (flag_work, flags), streamed=self.streamed, reduced=reduced)

    @property
    def staging_bytes(self) -> int:
        return 0 if self._staging is None else self._staging.numel() * self._staging.element_size()

    def _stage(self, bucket: Bucket) -> torch.Tensor:
        """Copies a non-owned bucket's gradients into the staging buffer, after the previous staged
        reduce has finished sending from it."""
        if self._staged is not None:
            self._staged.finish()
            self._staged = None
        first = bucket.params[0]
        if self._staging is None or self._staging.dtype != first.dtype:
            self._staging = torch.empty(self._staging_numel, dtype=first.dtype, device=first.device)
        flat = self._staging[: bucket.numel]
        offset = 0
        for param, shape in zip(bucket.params, bucket.shapes):
            count = shape.numel()
            if param.grad is None:
                flat[offset : offset + count].zero_()
            else:
                flat[offset : offset + count].copy_(param.grad.view(-1))
            offset += count
        return flat


def broadcast_params(buckets: list[Bucket]) -> None:
    """Every rank receives each owner's updated parameters, in place, one broadcast per bucket."""
    works = [dist.broadcast(bucket.flat_params(), src=bucket.owner_rank, async_op=True) for bucket in buckets]
    for work in works:
        work.wait()
        keep(work)


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A synchronous all-reduce whose work object is kept (see _kept_works)."""
    work = dist.all_reduce(tensor, op=op, async_op=True)
    work.wait()
    keep(work)
    return tensor


def all_reduce_scalar(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        all_reduce(value)
    return value
