"""One optimizer step seen from this rank: its mean loss over the micro-steps, its duration, and
the tokens it read, for the step lines and the monitors. Losses stay tensors until they are read,
so a step that prints nothing waits for no device."""

import time

import torch


class StepStats:
    def __init__(self):
        self._loss_sum, self._num_losses = None, 0
        self._num_tokens = 0
        self._last_end = time.perf_counter()
        self.loss: torch.Tensor | None = None  # mean loss of the last step (this rank's micro-batches)
        self.step_time_s = 0.0
        self.samples_per_s = 0.0
        self.tokens_per_s: float | None = None  # None when the engine saw no integer inputs (token ids)
        self.grad_norm: torch.Tensor | None = None  # the global norm, when clipping computed it
        self.snapshot_stall_s = 0.0  # how long the step waited for the last snapshot's copy
        self._swap_io_until_now = (0, 0)  # bytes read and written through the swap file before this step

    def swap_io_of_step(self, read_bytes: int, written_bytes: int) -> tuple[int, int]:
        """The swap file's bytes read and written since the last call, from its running totals."""
        before, self._swap_io_until_now = self._swap_io_until_now, (read_bytes, written_bytes)
        return read_bytes - before[0], written_bytes - before[1]

    def add_loss(self, loss: torch.Tensor) -> None:
        value = loss.detach().float().mean()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._num_losses += 1

    def add_inputs(self, args, kwargs) -> None:
        """Counts the elements of the first integer tensor among the model's inputs: token ids."""
        for value in (*args, *kwargs.values()):
            if torch.is_tensor(value) and not value.is_floating_point() and value.dtype != torch.bool:
                self._num_tokens += value.numel()
                return

    def end_step(self, num_samples: int, world_size: int) -> None:
        now = time.perf_counter()
        self.step_time_s, self._last_end = now - self._last_end, now
        self.loss = self._loss_sum / self._num_losses if self._num_losses else None
        self.samples_per_s = num_samples / self.step_time_s if self.step_time_s > 0 else 0.0
        # every rank reads the same micro batch (the batch rule), so the job read world_size x these tokens
        num_tokens = self._num_tokens * world_size
        self.tokens_per_s = num_tokens / self.step_time_s if num_tokens and self.step_time_s > 0 else None
        self._loss_sum, self._num_losses, self._num_tokens = None, 0, 0

    def line(self, engine) -> str:
        """The steps_per_print line."""
        parts = [f"step {engine.global_step}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss.item():.4f}")
        parts.append("lr [" + ", ".join(f"{group['lr']:.4g}" for group in engine.optimizer.param_groups) + "]")
        parts.append(f"samples/s {self.samples_per_s:.1f}")
        if self.tokens_per_s is not None:
            parts.append(f"tokens/s {self.tokens_per_s:.0f}")
        if engine.loss_scaler is not None:
            parts.append(f"loss scale {engine.loss_scaler.scale:g} skipped {engine.skipped_steps}")
        return " ".join(parts)
