"""The engine's monitor: builds the enabled backends on rank 0, turns each optimizer step into
events, and hands what the script adds (write_events as in DeepSpeed, or log_metrics) to every
backend. On other ranks every call is a no-op, so a script calls it on all ranks alike.

A step's records are complete when the next step's first forward starts (the script's work on the
step is over) or the monitor closes. A snapshot of the step waits for that before it commits
(wait_for_records): a worker killed in between loses the snapshot with the records, so the restart
redoes the step and writes them, instead of resuming past a step that has no line."""

import atexit
import numbers
import sys
import threading

import torch

from memfit.monitor.external import TensorboardMonitor, WandbMonitor
from memfit.monitor.files import CsvMonitor, JsonlMonitor
from memfit.runtime.memory_stats import peak_rss_bytes


def build_monitor(config, rank: int) -> "MonitorMaster":
    event_backends, jsonl = [], None
    if rank == 0:
        if config.tensorboard.enabled:
            event_backends.append(TensorboardMonitor(config.tensorboard))
        if config.wandb.enabled:
            event_backends.append(WandbMonitor(config.wandb))
        if config.csv_monitor.enabled:
            event_backends.append(CsvMonitor(config.csv_monitor))
        if config.memfit.jsonl_monitor.enabled:
            jsonl = JsonlMonitor(config.memfit.jsonl_monitor)
    return MonitorMaster(event_backends, jsonl, config.steps_per_print)


class MonitorMaster:
    def __init__(self, event_backends: list, jsonl: JsonlMonitor | None, flush_every_steps: int):
        self._backends = event_backends
        self._jsonl = jsonl
        self._flush_every = flush_every_steps
        self._step, self._samples, self._resumed = 0, 0, False
        self.enabled = bool(event_backends) or jsonl is not None
        self._gates_snapshots = self.enabled
        self._records = threading.Condition()
        self._complete_step, self._closed = 0, False  # the newest step whose records are complete
        self._script_added_to_step = False  # the script's values for the current step arrived
        self._script_adds = False  # the script has added values to some step (write_events, log_metrics)
        if self.enabled:
            atexit.register(self.close_at_exit)

    # ---- what the script calls ------------------------------------------------------------------
    def write_events(self, events) -> None:
        """DeepSpeed's monitor API: a list of (name, value, step) tuples, the step in samples."""
        self._write_events(events, from_script=True)

    def _write_events(self, events, from_script: bool) -> None:
        if not self.enabled:
            return
        if from_script:
            self._script_added_to_step = self._script_adds = True
        events = [(name, _number(value), step) for name, value, step in events]
        for backend in self._backends:
            backend.write_events(events, self._resumed)
        if self._jsonl is not None:
            self._jsonl.add({name.split("/")[-1]: value for name, value, _ in events})

    def log_metrics(self, values: dict) -> None:
        """Adds the script's metrics to the last step: to its JSONL line as they are, and as
        Train/Samples/<key> events where the value is a number."""
        if not self.enabled:
            return
        self._script_added_to_step = self._script_adds = True
        if self._jsonl is not None:
            self._jsonl.add(values)
        events = [(f"Train/Samples/{key}", _number(v), self._samples) for key, v in values.items() if _is_scalar(v)]
        for backend in self._backends:
            backend.write_events(events, self._resumed)

    # ---- what the engine calls ------------------------------------------------------------------
    def before_forward(self) -> None:
        """The previous step is over, with what the script added to it: its JSONL line is written."""
        self.finish_step()

    def finish_step(self) -> None:
        """The current step's records are complete: its JSONL line is written, and a snapshot of
        the step waiting for them may commit. Also called before the training thread waits for
        that snapshot, so a script that runs its model outside the engine cannot stall it."""
        if self._jsonl is not None:
            self._jsonl.write_pending()
        self._mark_complete(self._step)

    def wait_for_records(self, step: int) -> bool:
        """On a snapshot's copy thread: blocks until the records of `step` are complete. False if
        the monitor closed without them (a crash before the script added its values): a restore
        must not resume from that step's snapshot, since nothing would write its line again."""
        if not self._gates_snapshots:
            return True
        with self._records:
            self._records.wait_for(lambda: self._complete_step >= step or self._closed)
            return self._complete_step >= step

    def _mark_complete(self, step: int) -> None:
        with self._records:
            self._complete_step = max(self._complete_step, step)
            self._records.notify_all()

    def after_step(self, engine) -> None:
        if not self.enabled:
            return
        first = self._step == 0
        self._step, self._samples = engine.global_step, engine.global_samples
        if first:
            self._resumed = self._step > 1  # a resumed run appends to what the earlier one wrote
        self._script_added_to_step = False
        if self._jsonl is not None:
            self._jsonl.start_record(self._step, self._samples, self._resumed)
        events = engine_events(engine)
        if first and engine.restored_from is not None:  # the step a snapshot restore continued from
            events.append(("memfit/restored_from", engine.restored_from, self._samples))
        self._write_events(events, from_script=False)
        if self._step % self._flush_every == 0:
            self.flush()

    def flush(self) -> None:
        for backend in self._backends:
            backend.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self, crashed: bool = False) -> None:
        """A process ending on an uncaught exception (a collective whose peer died, say) may have
        left its last step before the script added to it: those records would lack the script's
        values (the loss), so the step's JSONL line is dropped and the step stays incomplete; a
        restart redoes it. A step the script did add to is complete, crash or not."""
        if not self.enabled:
            return
        complete = not crashed or self._script_added_to_step or not self._script_adds
        if self._jsonl is not None:
            self._jsonl.close(keep_pending=complete)
        for backend in self._backends:
            backend.close()
        self.enabled = False
        atexit.unregister(self.close_at_exit)
        if complete:
            self._mark_complete(self._step)
        with self._records:
            self._closed = True
            self._records.notify_all()

    def close_at_exit(self) -> None:
        self.close(crashed=getattr(sys, "last_value", None) is not None)


def engine_events(engine) -> list[tuple[str, float, int]]:
    """DeepSpeed's events for one optimizer step, then memfit's own."""
    samples, stats = engine.global_samples, engine.step_stats
    events = []
    if stats.loss is not None:
        events.append(("Train/Samples/train_loss", stats.loss.item(), samples))
    events.append(("Train/Samples/lr", engine.optimizer.param_groups[0]["lr"], samples))
    if engine.loss_scaler is not None:
        events.append(("Train/Samples/loss_scale", engine.loss_scaler.scale, samples))
        events.append(("memfit/skipped_steps", engine.skipped_steps, samples))
    events.append(("memfit/step_time_s", stats.step_time_s, samples))
    events.append(("memfit/samples_per_s", stats.samples_per_s, samples))
    if stats.tokens_per_s is not None:
        events.append(("memfit/tokens_per_s", stats.tokens_per_s, samples))
    if stats.grad_norm is not None:
        events.append(("memfit/grad_norm", stats.grad_norm.item(), samples))
    events.append(("memfit/peak_rss_bytes", peak_rss_bytes(), samples))
    if engine.device.type == "cuda":
        events.append(("memfit/device_peak_bytes", torch.cuda.max_memory_allocated(engine.device), samples))
    if engine.host_tier is not None:
        events.append(("memfit/host_tier_bytes", engine.host_tier.bytes_in_use, samples))
        if hasattr(engine.host_tier, "swap_bytes"):
            events.append(("memfit/nvme_tier_bytes", engine.host_tier.swap_bytes, samples))
    swapped = engine.swap_transferred_bytes()
    if swapped is not None:
        read_bytes, written_bytes = stats.swap_io_of_step(*swapped)
        events.append(("memfit/nvme_read_bytes", read_bytes, samples))  # this rank's, in this step
        events.append(("memfit/nvme_written_bytes", written_bytes, samples))
    if engine.snapshotter is not None:
        events.append(("memfit/snapshot_stall_s", stats.snapshot_stall_s, samples))
    return events


def _number(value):
    return value.item() if torch.is_tensor(value) else value


def _is_scalar(value) -> bool:
    return (torch.is_tensor(value) and value.numel() == 1) or (
        isinstance(value, numbers.Number) and not isinstance(value, bool)
    )
