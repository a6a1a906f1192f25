"""Metrics from the engine to TensorBoard, Weights & Biases, CSV (DeepSpeed's layout) and JSONL.

Events are DeepSpeed's (name, value, step) triples, the step being the number of samples trained
(`Train/Samples/train_loss`, `Train/Samples/lr`, `Train/Samples/loss_scale`) plus memfit's own
under `memfit/` (see engine_events). Only rank 0 writes. The CSV and JSONL files are flushed as
they are written and TensorBoard every steps_per_print optimizer steps (W&B's own process writes
as it goes), so a killed run loses at most one interval; a run that resumes (its first step is
not step 1) appends to what the earlier run wrote."""

from memfit.monitor.master import MonitorMaster, build_monitor

__all__ = ["MonitorMaster", "build_monitor"]
