"""Owner-major buckets: parameters sorted by owner, then model order, packed into buckets of at
most reduce_bucket_size elements that never span two owners, so a stage-2 bucket is one reduce to
one destination. A tensor larger than the bucket size gets a bucket of its own.

With contiguous gradients a bucket's parameters and gradients are views into one flat buffer
each, so collectives run in place: no flattening copies on the step's critical path."""

from dataclasses import dataclass, field

import torch


@dataclass
class Bucket:
    owner_rank: int
    params: list[torch.nn.Parameter]
    names: list[str]
    param_buffer: torch.Tensor | None = None  # flat storage the params view (multi-tensor buckets)
    grad_buffer: torch.Tensor | None = None  # flat storage the grads view, kept across steps
    grad_views: list[torch.Tensor] = field(default_factory=list)  # one view of grad_buffer per param
    # the parameters' full shapes, as built: at stage 3 a rank's copy of a tensor it does not own
    # is released between uses and has no elements
    shapes: list[torch.Size] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(shape.numel() for shape in self.shapes)

    def flat_params(self) -> torch.Tensor:
        return self.param_buffer if self.param_buffer is not None else self.params[0].data.view(-1)


def build_buckets(named_params, plan, bucket_numel: int, streamed: set[str] = frozenset()) -> list[Bucket]:
    """streamed: the names whose reduced gradients go to the owner's swap file (the streamed step
    on several ranks); a bucket holds only such tensors or none of them, so that the others keep a
    gradient buffer."""
    by_name = dict(named_params)
    buckets: list[Bucket] = []
    for owner_rank in range(plan.world_size):
        current = None
        for name in plan.owned(owner_rank):
            param = by_name[name]
            apart = current is not None and (name in streamed) != (current.names[0] in streamed)
            if current is None or apart or current.numel + param.numel() > bucket_numel:
                current = Bucket(owner_rank, [], [])
                buckets.append(current)
            current.params.append(param)
            current.names.append(name)
            current.shapes.append(param.shape)
    return buckets


def _views(flat: torch.Tensor, params) -> list[torch.Tensor]:
    views, offset = [], 0
    for param in params:
        views.append(flat[offset : offset + param.numel()].view_as(param))
        offset += param.numel()
    return views


def flatten_params(buckets: list[Bucket]) -> None:
    """Moves each multi-tensor bucket's parameters into one flat buffer they then view."""
    for bucket in buckets:
        if len(bucket.params) > 1:
            first = bucket.params[0]
            bucket.param_buffer = torch.empty(bucket.numel, dtype=first.dtype, device=first.device)
            for param, view in zip(bucket.params, _views(bucket.param_buffer, bucket.params)):
                view.copy_(param.data)
                param.data = view


def attach_grad_buffers(buckets: list[Bucket]) -> None:
    """Gives each bucket a zeroed flat gradient buffer and points every .grad into it; autograd
    then accumulates in place."""
    for bucket in buckets:
        first = bucket.params[0]
        bucket.grad_buffer = torch.zeros(bucket.numel, dtype=first.dtype, device=first.device)
        bucket.grad_views = _views(bucket.grad_buffer, bucket.params)
        for param, view in zip(bucket.params, bucket.grad_views):
            param.grad = view


def staging_numel(buckets: list[Bucket], stage: int, rank: int) -> int:
    """Elements of the buffer a rank sends non-owned multi-tensor buckets from at stage 2 (their
    gradients are not contiguous there); 0 where every bucket it reduces has a buffer or one tensor."""
    if stage < 2:
        return 0
    sizes = [b.numel for b in buckets if b.owner_rank != rank and len(b.params) > 1]
    return max(sizes, default=0)
