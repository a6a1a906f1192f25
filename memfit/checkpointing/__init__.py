"""Checkpoints and (soon) snapshots: the training state of each rank, its checksums, and the
atomic on-disk format that both use."""

from memfit.checkpointing.disk import load_checkpoint, save_checkpoint, verify_checkpoint
from memfit.checkpointing.integrity import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "verify_checkpoint"]
