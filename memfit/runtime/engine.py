"""The training engine: micro-steps, gradient reduction, the sharded optimizer step.

Design note. A step has four phases:
  1. Micro-steps: forward and backward; gradients accumulate in each parameter's .grad.
  2. Gradients are reduced bucket by bucket, owner-major: from post-accumulate-grad hooks as
     buckets fill (overlap_comm), or all at once after the backward. Stage 0/1 all-reduce on the
     boundary micro-step only. Stage 2 reduces to the owner after every micro-step's backward and
     non-owners drop the gradient, so during accumulation a rank holds only the gradients it owns
     (plus one micro-step's worth in flight), as in DeepSpeed; the owner's buffer accumulates the
     reduced sums. The loss is scaled by 1 / (accumulation steps x world size), so the reduced
     sum is the mean.
Memory reuse: parameters and the gradients a rank keeps are views into flat per-bucket buffers
allocated once, so reductions and broadcasts run in place.
  3. The owner clips with the global norm (one scalar all-reduce), then steps its optimizer on
     the fp32 masters of the tensors it owns and writes them back into the compute parameters.
  4. Owners broadcast their updated parameters (stage 1/2); the scheduler steps.
Invariant: between steps, every rank holds identical compute parameters and no gradients.
"""

import logging

import torch
import torch.distributed as dist

from memfit.runtime.zero.collectives import all_reduce_scalar, broadcast_params

logger = logging.getLogger("memfit")


class Engine:
    def __init__(
        self,
        *,
        model,
        config,
        rank,
        world_size,
        device,
        named_params,
        plan,
        buckets,
        grad_sync,
        masters,
        optimizer,
        lr_scheduler,
        micro_batch_size,
        accumulation_steps,
    ):
        self.module = model
        self.config = config
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stage = config.zero_optimization.stage
        self._named_params = named_params
        self._plan = plan
        self._buckets = buckets
        self._grad_sync = grad_sync
        self.masters = masters
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = accumulation_steps
        self.global_step = 0
        self.micro_step = 0
        self.grad_bytes_after_reduce = 0  # gradient bytes this rank held after the last reduction

    # ---- phase 1: micro-steps -------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def is_boundary(self) -> bool:
        return (self.micro_step + 1) % self.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of loss / (accumulation steps x world size). Stage 0/1 reduce on the boundary
        micro-step (in step() unless overlapped); stage 2 reduces to owners here, every micro-step."""
        self._grad_sync.before_backward(reducing=self.is_boundary() or self._grad_sync.reduces_every_backward)
        try:
            (loss / (self.gradient_accumulation_steps * self.world_size)).backward()
        finally:
            self._grad_sync.after_backward()
        self._count_grad_bytes()

    def _count_grad_bytes(self) -> None:
        self.grad_bytes_after_reduce = sum(
            p.grad.numel() * p.grad.element_size() for _, p in self._named_params if p.grad is not None
        )

    # ---- phases 2 to 4: reduce, clip, step, synchronise -----------------------------------------
    def step(self) -> None:
        """At an accumulation boundary: reduce, clip, step, synchronise. Otherwise only counts."""
        boundary = self.is_boundary()
        self.micro_step += 1
        if not boundary:
            return
        touched = self._grad_sync.finish_step()
        if self.world_size > 1 and not self._grad_sync.reduces_every_backward:
            self._count_grad_bytes()
        self.masters.take_grads({id(p) for (_, p), got in zip(self._named_params, touched) if got})
        self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.masters.write_back()
        self._grad_sync.reset_buffers()
        if self.stage > 0 and self.world_size > 1:
            broadcast_params(self._buckets)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1
        if self.rank == 0 and self.global_step % self.config.steps_per_print == 0:
            logger.info("step %d lr %s", self.global_step, [g["lr"] for g in self.optimizer.param_groups])

    def _clip_gradients(self) -> float | None:
        max_norm = self.config.gradient_clipping
        if max_norm <= 0:
            return None
        grads = self.masters.grads()
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for grad in grads:
            squares += grad.float().pow(2).sum()
        if self.stage > 0:
            all_reduce_scalar(squares, self.world_size)  # owners hold disjoint parts of the gradient
        total_norm = squares.sqrt()
        clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(clip_coef.to(grad.dtype))
        return float(total_norm)

    # ---- inspection -----------------------------------------------------------------------------
    def ownership(self) -> dict:
        """The plan: which rank owns each parameter, and the elements per rank."""
        return self._plan.summary()

    def memory_report(self) -> dict:
        """Bytes held by this rank, per category."""

        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        buffered = {id(p) for bucket in self._buckets if bucket.grad_buffer is not None for p in bucket.params}
        grads = [bucket.grad_buffer for bucket in self._buckets if bucket.grad_buffer is not None]
        grads += [p.grad for _, p in self._named_params if p.grad is not None and id(p) not in buffered]
        if self.masters.separate:
            grads += self.masters.grads()
        return {
            "params": nbytes(p for _, p in self._named_params),
            "grads": nbytes(grads),
            "optimizer_state": nbytes(state),
            "master_weights": self.masters.num_bytes,
        }

    def save_checkpoint(self, save_dir, tag=None, client_state=None, *, keep=None) -> str:
        """Saves the state of every rank under save_dir/tag (default global_step<N>), atomically;
        keep: then delete all but the newest `keep` checkpoints. Returns the tag directory."""
        from memfit.checkpointing import save_checkpoint

        return save_checkpoint(self, save_dir, tag, client_state, keep=keep)

    def load_checkpoint(self, load_dir, tag=None) -> dict:
        """Restores parameters, optimizer state, scheduler, step counters, RNG and module buffers
        from a checkpoint saved at any world size; returns the client_state saved with it."""
        from memfit.checkpointing import load_checkpoint

        return load_checkpoint(self, load_dir, tag)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
