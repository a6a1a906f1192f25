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

import contextlib
import logging
import os
import time

import torch
import torch.distributed as dist

from memfit.checkpointing.faults import fault_point
from memfit.offload.streamed_step import StoredGradient
from memfit.runtime.memory_stats import peak_rss_bytes
from memfit.runtime.step_stats import StepStats
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
        update,
        lr_scheduler,
        loss_scaler,
        host_tier,
        micro_batch_size,
        accumulation_steps,
        stage3=None,
        param_tier=None,
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
        self._update = update
        self.lr_scheduler = lr_scheduler
        self.loss_scaler = loss_scaler
        self.host_tier = host_tier
        self._stage3 = stage3  # stage 3: gathers and releases the tensors a rank does not own
        self.param_tier = param_tier  # offload_param "cpu": the host arena the owned tensors rest in
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = accumulation_steps
        self.global_step = 0
        self.global_samples = 0  # summed per step at the world size of that step, so a resume at another keeps it
        self.micro_step = 0
        self.skipped_steps = 0  # fp16 steps skipped for an overflow
        self.global_grad_norm = None  # the last step's unscaled global gradient norm (a 0-d tensor), if computed
        self.grad_bytes_after_reduce = 0  # gradient bytes this rank held after the last reduction
        self._auto_cast = config.fp16.enabled and config.fp16.auto_cast
        # gradient_allreduce_op "sum" (DeepSpeed's option) sums over ranks instead of averaging
        self._ranks_averaged = world_size if config.gradient_allreduce_op == "mean" else 1
        self.snapshotter = None  # set by the build when snapshots are on (memfit/checkpointing/snapshot.py)
        self.client_state, self.restored_from, self._client_state_source = {}, None, None
        self.job_id, self.fingerprint = "", None  # set by the build (memfit/checkpointing/identity.py)
        self.step_stats = StepStats()  # this rank's loss and timing of the last optimizer step
        self.monitor = None  # set by the build: TensorBoard, W&B, CSV, JSONL (memfit/monitor)

    # ---- phase 1: micro-steps -------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if self._auto_cast:  # fp16.auto_cast: floating-point inputs in the compute dtype
            args = tuple(_to_half(a) for a in args)
            kwargs = {key: _to_half(value) for key, value in kwargs.items()}
        if self.module.training:
            self.step_stats.add_inputs(args, kwargs)
            if self.monitor is not None:
                self.monitor.before_forward()
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "Engine":
        """The module's train mode, as on an nn.Module (dropout, batch-norm statistics)."""
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def is_boundary(self) -> bool:
        return (self.micro_step + 1) % self.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Backward of loss x loss scale / (accumulation steps x world size). Stage 0/1 reduce on the
        boundary micro-step (in step() unless overlapped); stage 2 reduces to owners here, every
        micro-step."""
        self._grad_sync.before_backward(reducing=self.is_boundary() or self._grad_sync.reduces_every_backward)
        streamed = self._streamed
        if streamed is not None:
            if self.is_boundary() and streamed.backward_update is not None and self.snapshotter is not None:
                self.snapshotter.wait_for_copy()  # the update starts in this backward
            streamed.before_backward(final=self.is_boundary())
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        self.step_stats.add_loss(loss)
        try:
            if scale != 1.0:
                loss = loss * scale
            (loss / (self.gradient_accumulation_steps * self._ranks_averaged)).backward(retain_graph=retain_graph)
        finally:
            self._grad_sync.after_backward()
            if self._stage3 is not None:
                self._stage3.after_backward()
            if streamed is not None:
                streamed.after_backward()
        self._count_grad_bytes()

    def _count_grad_bytes(self) -> None:
        streamed = self._streamed
        self.grad_bytes_after_reduce = sum(  # what is held: a streamed gradient rests in the swap file
            p.grad.numel() * p.grad.element_size()
            for _, p in self._named_params
            if p.grad is not None and not (streamed is not None and streamed.has_grad(p))
        )

    # ---- phases 2 to 4: reduce, clip, step, synchronise -----------------------------------------
    def step(self) -> None:
        """At an accumulation boundary: reduce, clip, step, synchronise. Otherwise only counts. An
        fp16 step whose gradients overflow on any rank is skipped (no update, no scheduler step),
        as in DeepSpeed."""
        boundary = self.is_boundary()
        self.micro_step += 1
        if not boundary:
            return
        if self.snapshotter is not None:
            waited_from = time.perf_counter()
            self.snapshotter.wait_for_copy()  # the last snapshot's lazy copy reads what the update writes
            self.step_stats.snapshot_stall_s = time.perf_counter() - waited_from
        if self._stage3 is not None:
            self._stage3.check_same_use()
        touched = self._grad_sync.finish_step()
        if self.world_size > 1 and not self._grad_sync.reduces_every_backward:
            self._count_grad_bytes()
        grads = self._update.gradients({id(p) for (_, p), got in zip(self._named_params, touched) if got})
        multiplier, overflow = self._gradient_multiplier(grads)
        with self._owned_in_memory(for_step=True):  # offload_param "nvme": for the update and the snapshot
            if overflow:
                self._update.skip()
                self.skipped_steps += 1
            else:
                self._update.apply(multiplier)
            self._grad_sync.reset_buffers()
            if not overflow:
                self.sync_params()
            if self.loss_scaler is not None:
                self.loss_scaler.update(overflow)
            if not overflow and self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.global_step += 1
            self.global_samples += self.micro_batch_size * self.gradient_accumulation_steps * self.world_size
            if self.snapshotter is not None:
                self.snapshotter.after_step(self)
        self.step_stats.end_step(
            self.micro_batch_size * self.gradient_accumulation_steps * self.world_size, self.world_size
        )
        if self.monitor is not None:
            self.monitor.after_step(self)
        if self.rank == 0 and self.global_step % self.config.steps_per_print == 0:
            logger.info("%s", self.step_stats.line(self))

    @property
    def _streamed(self):
        """The StreamedStep where gradients and the update stream (offload/streamed_step.py), or None."""
        return self._stage3.streamed if self._stage3 is not None else None

    def _owned_in_memory(self, for_step: bool = False):
        if self._stage3 is None:
            return contextlib.nullcontext()
        # a streamed update reads each tensor itself; a snapshot of the step and checkpoints read them all
        streamed = for_step and self._streamed is not None and self.snapshotter is None
        return self._stage3.owned_in_memory(streamed_update=streamed)

    def sync_params(self) -> None:
        """Owners hand their updated parameters to every rank (stage 1/2: all of them; stage 3: the
        ones every rank keeps whole; the others are gathered from their owners when used)."""
        if self.stage == 0 or self.world_size == 1:
            return
        if self._stage3 is not None:
            self._stage3.sync_persistent()
        else:
            broadcast_params(self._buckets)

    def gathered_parameters(self, params=None):
        """A context in which `params` (default: every parameter) are whole on every rank; at stage 3
        each is gathered from its owner and released at the end, elsewhere nothing moves. Every
        rank must enter it with the same parameters."""
        if self._stage3 is None:
            return contextlib.nullcontext()
        return self._stage3.gathered(None if params is None else list(params))

    def _gradient_multiplier(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor | None, bool]:
        """(what to multiply every gradient by, whether the step overflowed). The multiplier folds
        the loss-scale division into the clipping coefficient, so gradients are touched once; the
        global norm is one all-reduce of a scalar (owners hold disjoint parts of the gradient)."""
        max_norm = self.config.gradient_clipping
        scaler = self.loss_scaler
        if max_norm <= 0 and scaler is None:
            return None, False
        if max_norm <= 0:  # fp16 without clipping: only the overflow check
            overflow = self._agree_on_overflow(self._update.nonfinite(grads))
            return (None if overflow else torch.tensor(1.0 / scaler.scale)), overflow
        norms = [grad.fp32_norm() if isinstance(grad, StoredGradient) else fp32_norm(grad) for grad in grads]
        squares = torch.linalg.vector_norm(torch.stack(norms)) ** 2 if norms else torch.zeros((), device=self.device)
        if self.stage > 0:
            all_reduce_scalar(squares, self.world_size)
        total_norm = squares.sqrt()
        scale = scaler.scale if scaler is not None else 1.0
        self.global_grad_norm = total_norm / scale  # of the unscaled gradients
        self.step_stats.grad_norm = self.global_grad_norm  # for the monitors
        if scaler is not None and not bool(torch.isfinite(total_norm)):
            return None, True
        clip_coef = torch.clamp(max_norm / (total_norm / scale + 1e-6), max=1.0)
        return (clip_coef / scale if scale != 1.0 else clip_coef), False

    def _agree_on_overflow(self, local: bool) -> bool:
        if self.stage == 0 or self.world_size == 1:
            return local  # every rank holds the same reduced gradients
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        all_reduce_scalar(flag, self.world_size)
        return bool(flag.item() > 0)

    # ---- inspection -----------------------------------------------------------------------------
    def ownership(self) -> dict:
        """The plan: which rank owns each parameter, and the elements per rank."""
        return self._plan.summary()

    def swap_transferred_bytes(self) -> tuple[int, int] | None:
        """(bytes read, bytes written) so far through this rank's swap files, optimizer state's and
        parameters'; None without any."""
        totals = []
        if hasattr(self.host_tier, "swap_transferred_bytes"):
            totals.append(self.host_tier.swap_transferred_bytes)
        if self._stage3 is not None and self._stage3.store is not None:
            totals.append(self._stage3.store.transferred_bytes)
        if not totals:
            return None
        return sum(read for read, _ in totals), sum(written for _, written in totals)

    def memory_report(self) -> dict:
        """Bytes held by this rank, per category (params: every module parameter, frozen ones too;
        grads, of which grad_staging is the buffer non-owned stage-2 buckets are sent from;
        master_weights; optimizer_state) and per tier ("device": where the model runs, "host": the
        host tier's arenas under CPU offload), and the process's peak RSS so far."""

        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        held = [p for p in self.module.parameters() if self._stage3 is None or self._stage3.holds(p)]
        buffered = {id(p) for bucket in self._buckets if bucket.grad_buffer is not None for p in bucket.params}
        grads = [bucket.grad_buffer for bucket in self._buckets if bucket.grad_buffer is not None]
        streamed = self._streamed
        on_nvme = {id(p) for p in streamed.params if streamed.has_grad(p)} if streamed is not None else set()
        grads += [p.grad for _, p in self._named_params if p.grad is not None and id(p) not in buffered | on_nvme]
        if self.masters.separate:
            grads += self.masters.grads()
        store = self._stage3.store if self._stage3 is not None else None  # offload_param "nvme"
        # values and gradients the store keeps in host memory (max_in_cpu)
        kept, kept_grads = (store.kept_bytes, store.kept_grad_bytes) if store is not None else (0, 0)
        report = {
            "params": nbytes(held) + kept,  # frozen ones too; a tied tensor once
            "grads": nbytes(grads) + kept_grads + self._grad_sync.reducer.staging_bytes,
            "optimizer_state": self._update.state_bytes,
            "master_weights": self._update.master_bytes,
        }
        report["grad_staging"] = self._grad_sync.reducer.staging_bytes  # included in grads
        offloaded = report["optimizer_state"] + report["master_weights"]
        host = self.host_tier.bytes_in_use if self.host_tier is not None else 0
        in_host_memory = (self.param_tier.bytes_in_use if self.param_tier is not None else 0) + kept + kept_grads
        report["by_tier"] = {
            "device": report["params"]
            - in_host_memory
            + report["grads"]
            + (0 if self.host_tier is not None else offloaded),
            "host": host + in_host_memory,
        }
        if hasattr(self.host_tier, "swap_bytes"):  # offload_optimizer "nvme": the rank's swap file
            report["by_tier"]["nvme"] = self.host_tier.swap_bytes
        if store is not None:
            report["by_tier"]["nvme"] = report["by_tier"].get("nvme", 0) + store.capacity_bytes
        report["peak_rss_bytes"] = peak_rss_bytes()
        return report

    def save_checkpoint(self, save_dir, tag=None, client_state=None, *, keep=None) -> str:
        """Saves the state of every rank under save_dir/tag (default global_step<N>), atomically;
        keep: then delete all but the newest `keep` checkpoints. Returns the tag directory."""
        from memfit.checkpointing import save_checkpoint

        with self._owned_in_memory():
            return save_checkpoint(self, save_dir, tag, client_state, keep=keep)

    def load_checkpoint(self, load_dir, tag=None, *, load_optimizer_states: bool = True) -> dict:
        """Restores parameters, optimizer state, scheduler, step counters, RNG and module buffers
        from a checkpoint saved at any world size; returns the client_state saved with it. The
        optimizer's hyperparameters that the config sets are the config's (each difference is
        logged); a checkpoint of another optimizer kind is refused unless load_optimizer_states is
        False, which loads everything but the optimizer state and the scheduler."""
        from memfit.checkpointing import load_checkpoint

        if self.snapshotter is not None:
            self.snapshotter.join_copy()  # the last snapshot's lazy copy reads what loading overwrites
        with self._owned_in_memory():
            return load_checkpoint(self, load_dir, tag, load_optimizer_states=load_optimizer_states)

    def save_16bit_model(self, save_dir, save_filename: str = "pytorch_model.bin") -> bool:
        """The module's state dict, as it trains (16-bit under bf16/fp16), as DeepSpeed's
        save_16bit_model: rank 0 writes save_dir/save_filename (safetensors when the name ends in
        .safetensors, torch.save otherwise); every rank holds the same parameters between steps. At
        stage 3 every rank takes part, each tensor gathered in turn, when
        stage3_gather_16bit_weights_on_model_save is true; otherwise nothing is written (False), as in
        DeepSpeed."""
        from memfit.checkpointing.export import save_module_state

        if self._stage3 is not None and not self.config.zero_optimization.stage3_gather_16bit_weights_on_model_save:
            logger.warning(
                "save_16bit_model: nothing written to %s: at ZeRO stage 3 each tensor lives on its owner; set "
                "zero_optimization.stage3_gather_16bit_weights_on_model_save true to gather them, or export a "
                "checkpoint with `memfit export`",
                save_dir,
            )
            return False
        path = None
        if self.rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(os.fspath(save_dir), save_filename)
        if path is not None or self._stage3 is not None:
            save_module_state(self.module, path, self._stage3.gathered if self._stage3 is not None else None)
        self.barrier()
        return True

    def log_metrics(self, values: dict) -> None:
        """Adds the script's metrics (validation loss, ...) to the last step's monitor records;
        a no-op without monitors and on ranks other than 0."""
        fault_point("script-metrics", self.rank)  # crash tests: after the step's snapshot, before its line
        if self.monitor is not None:
            self.monitor.log_metrics(values)

    def set_client_state(self, state) -> None:
        """What each snapshot keeps as the client's state (the data position): a dict, or a callable
        returning one, called at each snapshot. A restore hands it back as engine.client_state.
        A value a restore could not load (a numpy scalar, a datetime) is a ValueError, here or at
        the snapshot that would hold it."""
        from memfit.checkpointing.client_state import check_client_state

        if not callable(state):
            check_client_state(state, "engine.set_client_state")
        self._client_state_source = state

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _to_half(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(torch.float16)
    return value


NORM_CHUNK_NUMEL = 1 << 18


def fp32_norm(grad: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a gradient, accumulated in fp32. A 16-bit gradient is widened a chunk of
    1 MiB at a time: torch's vector_norm(dtype=float32) returns a result that keeps the whole
    widened copy alive, so the norms of all gradients held an fp32 copy of every one at once
    (4 bytes per owned parameter at the step's peak)."""
    if grad.dtype == torch.float32:
        return torch.linalg.vector_norm(grad)
    chunks = grad.reshape(-1).split(NORM_CHUNK_NUMEL)
    if len(chunks) == 1:
        return torch.linalg.vector_norm(chunks[0].float())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c.float()) for c in chunks]))
