"""DeepSpeed's engine interface over a memfit Engine. As DeepSpeed's engine, it is an nn.Module
holding the model as `module` (parameters(), named_parameters() with the "module." prefix,
train(), eval(), state_dict()); anything else it does not define reaches the memfit engine.
Without an optimizer (none passed to initialize, no optimizer section) it runs forward only, as
DeepSpeed's: it has no optimizer or scheduler, and backward and step are refused."""

import contextlib
import copy
import logging
import os

import torch

from memfit.deepspeed.errors import DeepSpeedUsageError

logger = logging.getLogger("memfit")


class DeepSpeedEngine(torch.nn.Module):
    def __init__(self, engine, has_optimizer: bool = True):
        super().__init__()
        self.module = engine.module  # a submodule, as in DeepSpeed: names gain the "module." prefix
        object.__setattr__(self, "_engine", engine)  # a plain attribute, not a second submodule
        self._step_applied = False
        self._in_no_sync = False
        self._has_optimizer = has_optimizer

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._engine, name)

    def forward(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    @property
    def optimizer(self):
        return self._engine.optimizer if self._has_optimizer else None

    @property
    def lr_scheduler(self):
        return self._engine.lr_scheduler if self._has_optimizer else None

    def _require_optimizer(self, method: str) -> None:
        if not self._has_optimizer:
            raise DeepSpeedUsageError(
                f"{method}: this engine has no optimizer (none passed to initialize and no optimizer section in "
                "the config); it runs forward only"
            )

    @property
    def config(self):
        return self._engine.config

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        self._require_optimizer("backward")
        if not scale_wrt_gas:
            raise ValueError("scale_wrt_gas=False: memfit always divides the loss by gradient_accumulation_steps")
        self._engine.backward(loss, retain_graph=retain_graph)
        return loss

    def step(self, lr_kwargs=None):
        self._require_optimizer("step")
        if lr_kwargs:
            raise ValueError("lr_kwargs: not supported by memfit's schedulers")
        if self._in_no_sync and self._engine.world_size > 1 and self._engine.is_boundary():
            raise ValueError(
                "engine.step() at an accumulation boundary inside no_sync(): memfit reduces gradients at every "
                "boundary; leave no_sync() before the boundary step"
            )
        skipped_before = self._engine.skipped_steps
        boundary = self._engine.is_boundary()
        self._engine.step()
        self._step_applied = boundary and self._engine.skipped_steps == skipped_before

    def zero_grad(self):
        self._engine.module.zero_grad()

    def was_step_applied(self) -> bool:
        """Whether the last step() updated the parameters (False off a boundary or after an fp16
        overflow), as DeepSpeed's."""
        return self._step_applied

    def get_global_grad_norm(self) -> float | None:
        """The global L2 norm of the last step's unscaled gradients; None before the first step
        and when the step computed none (no clipping, no fp16)."""
        norm = self._engine.global_grad_norm
        return None if norm is None else float(norm)

    @contextlib.contextmanager
    def no_sync(self):
        """DeepSpeed's no_sync: memfit already reduces only at accumulation boundaries, so the
        micro-steps inside need nothing; a boundary step inside is refused (on several ranks)
        rather than stepping on unreduced gradients. Refused at stage 2, as in DeepSpeed."""
        if self.zero_optimization_stage() >= 2:
            raise ValueError("no_sync: not compatible with ZeRO stage 2 (gradients are reduced at every micro-step)")
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    def zero_optimization_stage(self) -> int:
        return self._engine.config.zero_optimization.stage

    def gradient_clipping(self) -> float:
        return self._engine.config.gradient_clipping

    def fp16_enabled(self) -> bool:
        return self._engine.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self._engine.config.bf16.enabled

    @property
    def global_steps(self) -> int:
        return self._engine.global_step

    @property
    def global_samples(self) -> int:
        return self._engine.global_samples

    @property
    def skipped_steps(self) -> int:
        return self._engine.skipped_steps

    def get_lr(self) -> list[float]:
        """Each group's lr; [] without an optimizer, as DeepSpeed's."""
        return [group["lr"] for group in self.optimizer.param_groups] if self._has_optimizer else []

    def get_mom(self) -> list:
        """Each group's betas (Adam family) or momentum (SGD); [] without an optimizer, as DeepSpeed's."""
        if not self._has_optimizer:
            return []
        return [group["betas"] if "betas" in group else group.get("momentum") for group in self.optimizer.param_groups]

    def get_loss_scale(self) -> float:
        return self._engine.loss_scaler.scale if self._engine.loss_scaler is not None else 1.0

    def train_batch_size(self) -> int:
        return self._engine.micro_batch_size * self._engine.gradient_accumulation_steps * self._engine.world_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._engine.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self._engine.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return self._engine.is_boundary()

    @property
    def global_rank(self) -> int:
        return self._engine.rank

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def dp_world_size(self) -> int:
        return self._engine.world_size

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        if not save_latest or exclude_frozen_parameters:
            raise ValueError("save_latest=False / exclude_frozen_parameters=True: not supported by memfit")
        self._engine.save_checkpoint(save_dir, tag, client_state or {})
        return True

    def load_checkpoint(
        self,
        load_dir,
        tag=None,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_only=False,
        custom_load_fn=None,
    ):
        """(path, client_state); (None, None) with a warning when load_dir holds no checkpoint,
        as in DeepSpeed. load_optimizer_states / load_lr_scheduler_states False keep this
        engine's optimizer state / schedule; load_module_only keeps both and the step counters
        and loss scale, loading the weights alone."""
        if not load_module_strict:
            raise ValueError("load_module_strict=False: memfit loads every parameter of the module")
        if custom_load_fn is not None:
            raise ValueError("custom_load_fn: not supported by memfit")
        if tag is None and not os.path.exists(os.path.join(os.fspath(load_dir), "latest")):
            logger.warning("no checkpoint in %s (no 'latest' file); nothing loaded", load_dir)
            return None, None
        keep_optimizer = load_module_only or not load_optimizer_states
        keep_scheduler = load_module_only or not load_lr_scheduler_states
        kept = self._keep_state(optimizer=keep_optimizer, scheduler=keep_scheduler, counters=load_module_only)
        # neither optimizer state nor schedule wanted: the saved optimizer may be of another kind
        read_optimizer = not (keep_optimizer and keep_scheduler)
        client_state = self._engine.load_checkpoint(load_dir, tag, load_optimizer_states=read_optimizer)
        kept()
        tag = tag or open(os.path.join(os.fspath(load_dir), "latest")).read().strip()
        return os.path.join(os.fspath(load_dir), tag), client_state

    def _keep_state(self, *, optimizer: bool, scheduler: bool, counters: bool):
        """Copies what a partial load keeps and returns the function that puts it back."""
        engine = self._engine
        kept_optimizer = None
        if optimizer:
            if any("master" in state for state in engine.optimizer.state.values()):
                raise ValueError(
                    "load_optimizer_states=False / load_module_only=True: not supported with CPUAdamW's fused "
                    "step, whose optimizer state holds the fp32 master weights"
                )
            kept_optimizer = copy.deepcopy(engine.optimizer.state_dict())
        kept_scheduler = engine.lr_scheduler.state_dict() if scheduler and engine.lr_scheduler is not None else None
        kept_counters = None
        if counters:
            scaler = engine.loss_scaler.state_dict() if engine.loss_scaler is not None else None
            kept_counters = (engine.global_step, engine.micro_step, engine.skipped_steps, scaler)

        def restore():
            if kept_optimizer is not None:
                engine.optimizer.load_state_dict(kept_optimizer)
                if kept_scheduler is None and engine.lr_scheduler is not None:
                    # the loaded schedule sets its lr again (memfit's schedules do on load)
                    engine.lr_scheduler.load_state_dict(engine.lr_scheduler.state_dict())
            if kept_scheduler is not None:
                engine.lr_scheduler.load_state_dict(kept_scheduler)
            if kept_counters is not None:
                engine.global_step, engine.micro_step, engine.skipped_steps, scaler = kept_counters
                if scaler is not None:
                    engine.loss_scaler.load_state_dict(scaler)

        return restore

    def deepspeed_io(self, dataset, batch_size=None, route=None, pin_memory=True, data_sampler=None, collate_fn=None,
                     num_local_io_workers=None):  # fmt: skip
        """A DataLoader of micro-batches, each rank its own shard (DistributedSampler), as
        DeepSpeed's; the config's dataloader_drop_last drops a last incomplete batch."""
        world_size, rank = self._engine.world_size, self._engine.rank
        if data_sampler is None and world_size > 1:
            data_sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world_size, rank=rank)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size or self._engine.micro_batch_size,
            sampler=data_sampler,
            collate_fn=collate_fn,
            num_workers=num_local_io_workers or 0,
            drop_last=self._engine.config.dataloader_drop_last,
        )
