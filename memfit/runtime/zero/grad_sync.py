"""Gradient synchronisation across data-parallel ranks: when each bucket is reduced, in what
order, and which parameters received a gradient at all.

Design note.
- One order on every rank. Collectives are matched by the order in which ranks issue them, so
  every rank launches its bucket reductions in one static order: descending index of each
  bucket's first parameter in model order, the order in which backward usually completes them.
  A post-accumulate-grad hook marks a bucket ready; ready buckets are launched only up to the
  first one that is not ready yet. A bucket still incomplete when backward ends (a parameter
  this rank did not use: mixture-of-experts routing, a conditional layer) is launched then,
  still in order. Launching in hook order instead would sum unrelated buckets together.
- Which parameters have a gradient. The same hook marks each parameter that received one. At
  the step the marks are OR-ed across ranks (one small all-reduce), and a parameter that no rank
  touched keeps grad None in the optimizer, which then skips it as torch.optim does (no weight
  decay, no moment update). A parameter used on some ranks only is reduced normally.
- The user's zero_grad(). Each .grad is a view into its bucket's flat buffer. zero_grad() may
  drop it (set_to_none), after which autograd would allocate a fresh tensor outside the buffer.
  Before every backward and before reducing, each .grad is put back into its view: zeroed if it
  was dropped (the user discarded it), copied if a fresh tensor appeared.
- Gradients written by hand (`p.grad = g`, or into p.grad in place) before step(), with no
  backward: torch and DeepSpeed step on them. A fresh tensor is copied into the view and marks
  its parameter; at the step, a parameter no hook marked whose view holds a nonzero value was
  written in place (a check only for the unmarked, usually none). At stage 2 on several ranks
  gradients are reduced during backward, so only the ones backward produced are reduced.
- Two reducing backwards in one step (stage 0/1 with overlap_comm). The first one's buffers are
  already reduced when the second begins: they are set aside, the second backward is reduced on
  its own, and the two sums are added. Stage 2 needs no such care: owners accumulate reduced
  sums in their buffers and non-owners drop what they sent.
"""

import functools

import torch
import torch.distributed as dist

from memfit.runtime.zero.buckets import Bucket
from memfit.runtime.zero.collectives import all_reduce, release_kept_works


class GradientSync:
    def __init__(self, named_params, buckets: list[Bucket], reducer, *, stage: int, world_size: int, overlap: bool):
        self.params = [param for _, param in named_params]
        self.buckets = buckets
        self.reducer = reducer
        self.distributed = world_size > 1
        self.overlap = overlap and self.distributed
        self.reduces_every_backward = stage >= 2 and self.distributed
        index_of = {id(param): index for index, param in enumerate(self.params)}
        self._index_of = index_of
        self.bucket_of = [0] * len(self.params)
        for bucket_index, bucket in enumerate(buckets):
            for param in bucket.params:
                self.bucket_of[index_of[id(param)]] = bucket_index
        self.launch_order = sorted(range(len(buckets)), key=lambda b: -min(index_of[id(p)] for p in buckets[b].params))
        self.touched = [False] * len(self.params)  # got a gradient here since the last reduction
        self.has_grad = [False] * len(self.params)  # stage 2: some rank gave one since the step
        self._reducing = False
        self._num_ready = [0] * len(buckets)
        self._next_launch = 0  # position in launch_order
        self._pending = []
        self._reduced_since_step = False
        self._set_aside: list[torch.Tensor | None] | None = None
        for index, param in enumerate(self.params):
            param.register_post_accumulate_grad_hook(functools.partial(self._on_grad, index))

    # ---- around each backward -------------------------------------------------------------------
    def before_backward(self, reducing: bool) -> None:
        """reducing: this backward's gradients are reduced (stage 2: always; stage 0/1: on the
        accumulation boundary)."""
        release_kept_works()
        if reducing and self.overlap and self._reduced_since_step and not self.reduces_every_backward:
            self._reduce_all()
            self._put_reduced_aside()
        self.reattach_grads()
        self._reducing = reducing and self.distributed

    def after_backward(self) -> None:
        was_reducing, self._reducing = self._reducing, False
        # Whether any bucket was launched during backward differs between ranks; that a
        # reducing backward happened does not, so it decides the set-aside on every rank alike.
        self._reduced_since_step |= was_reducing and self.overlap
        if was_reducing and self.reduces_every_backward:
            self._reduce_all()  # finished now: the next backward adds into these buffers
            # Owners learn which of their tensors got a gradient on any rank in this backward;
            # a later zero_grad() on the owner clears it again (reattach_grads).
            anywhere = self._or_across_ranks(self.touched)
            self.has_grad = [had or got for had, got in zip(self.has_grad, anywhere)]
            self.touched = [False] * len(self.params)

    def _on_grad(self, param_index: int, param) -> None:
        self.touched[param_index] = True
        if self._reducing and self.overlap:
            bucket_index = self.bucket_of[param_index]
            self._num_ready[bucket_index] += 1
            self._launch_ready()
            self._finish_completed()

    def touched_now(self, param) -> bool:
        """Whether this rank gave the tensor a gradient since the last reduction."""
        return self.touched[self._index_of[id(param)]]

    def _finish_completed(self) -> None:
        """Finishes the reduces already completed, so that what they hold is let go during backward."""
        still = []
        for pending in self._pending:
            if pending.completed():
                pending.finish()
            else:
                still.append(pending)
        self._pending = still

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.launch_order):
            bucket_index = self.launch_order[self._next_launch]
            if self._num_ready[bucket_index] < len(self.buckets[bucket_index].params):
                return
            self._launch_next()

    def _launch_next(self) -> None:
        bucket = self.buckets[self.launch_order[self._next_launch]]
        self._pending.append(self.reducer.start(bucket))
        self._next_launch += 1

    def _reduce_all(self) -> None:
        """Launches every bucket not launched yet, in order, and waits for all of them."""
        for pending in self._pending:
            pending.finish()
        self._pending = []
        self.reattach_grads()
        while self._next_launch < len(self.launch_order):
            self._launch_next()
        for pending in self._pending:
            pending.finish()
        self._pending = []
        self._num_ready = [0] * len(self.buckets)
        self._next_launch = 0

    def _put_reduced_aside(self) -> None:
        aside = [b.grad_buffer.clone() if b.grad_buffer is not None else None for b in self.buckets]
        if self._set_aside is not None:
            for kept, new in zip(self._set_aside, aside):
                if kept is not None:
                    new.add_(kept)
        self._set_aside = aside
        for bucket in self.buckets:
            if bucket.grad_buffer is not None:
                bucket.grad_buffer.zero_()

    # ---- at the step ----------------------------------------------------------------------------
    def finish_step(self) -> list[bool]:
        """Completes the reduction of this step's gradients and returns, per parameter, whether
        any rank gave it a gradient since the last step."""
        if self.distributed and not self.reduces_every_backward:
            self._reduce_all()
        else:
            self.reattach_grads()
        if not self.reduces_every_backward:
            self._mark_written_in_place()
        if self._set_aside is not None:
            for bucket, kept in zip(self.buckets, self._set_aside):
                if kept is not None:
                    bucket.grad_buffer.add_(kept)
            self._set_aside = None
        if self.reduces_every_backward:
            got_grad = self.has_grad
        else:
            got_grad = self._or_across_ranks(self.touched)
        self.touched = [False] * len(self.params)
        self.has_grad = [False] * len(self.params)
        self._reduced_since_step = False
        return got_grad

    def _mark_written_in_place(self) -> None:
        for bucket in self.buckets:
            if bucket.grad_buffer is None:
                continue
            for param, view in zip(bucket.params, bucket.grad_views):
                index = self._index_of[id(param)]
                if not self.touched[index] and bool(view.any()):
                    self.touched[index] = True

    def _or_across_ranks(self, flags: list[bool]) -> list[bool]:
        if not self.distributed:
            return list(flags)
        tensor = torch.tensor(flags, dtype=torch.int32)
        all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(flag) for flag in tensor.tolist()]

    def reset_buffers(self) -> None:
        """Zeroes the gradient buffers and points every .grad at its view again."""
        for bucket in self.buckets:
            if bucket.grad_buffer is not None:
                bucket.grad_buffer.zero_()
                for param, view in zip(bucket.params, bucket.grad_views):
                    param.grad = view

    def reattach_grads(self) -> None:
        """Puts each .grad back into its bucket view after a user's zero_grad() or an autograd
        allocation; a dropped gradient counts as discarded, as in torch."""
        for bucket in self.buckets:
            if bucket.grad_buffer is None:
                continue
            for param, view in zip(bucket.params, bucket.grad_views):
                grad = param.grad
                same_storage = grad is not None and grad.data_ptr() == view.data_ptr() and grad.shape == view.shape
                if grad is view or same_storage:
                    continue  # still the view (the usual case)
                if grad is None:
                    view.zero_()
                    index = self._index_of[id(param)]
                    self.touched[index] = self.has_grad[index] = False
                else:
                    view.copy_(grad)  # autograd's fresh tensor, or one assigned by hand
                    self.touched[self._index_of[id(param)]] = True
                param.grad = view
