"""An optimizer changed between a save and a resume, decided as DeepSpeed does: the checkpoint's
optimizer state, the config's hyperparameters where the config sets them (each difference logged
on rank 0). State that means something else under the new optimizer (AdamW's moments for SGD,
Lamb or GaLore, decoupled weight decay for L2) is refused instead, naming both optimizers and the
way to load the weights alone."""

import logging

import torch

from memfit.checkpointing.integrity import CheckpointError

logger = logging.getLogger("memfit")


def check_optimizer_kind(engine, source) -> None:
    """Raises CheckpointError when source was saved by an optimizer whose state this job's cannot
    use. A checkpoint without a fingerprint (older memfit) is not checked."""
    saved = getattr(source, "fingerprint", None)
    current = getattr(engine, "fingerprint", None)
    if not saved or not current or saved.get("optimizer") == current["optimizer"]:
        return
    raise CheckpointError(
        f"{source.description}: saved with optimizer {saved.get('optimizer')}, this job uses {current['optimizer']}; "
        "its optimizer state does not carry over. To load the weights without it: "
        "engine.load_checkpoint(DIR, TAG, load_optimizer_states=False); to start fresh, point the job elsewhere"
    )


def _same(saved, current) -> bool:
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return len(saved) == len(current) and all(_same(a, b) for a, b in zip(saved, current))
    if torch.is_tensor(saved) or torch.is_tensor(current):
        return bool(torch.as_tensor(saved).eq(torch.as_tensor(current)).all())
    return saved == current


def keep_config_hyperparameters(engine, merged: dict, saved_group: dict, built_group: dict, changed: dict) -> None:
    """merged: a group's hyperparameters as saved; those the config sets are put back to the
    built optimizer's (the config's) values. changed collects key -> (saved, config)."""
    config = engine.config.optimizer
    for key in config.params if config is not None else ():
        if key in built_group and key in saved_group and not _same(saved_group[key], built_group[key]):
            merged[key] = built_group[key]
            changed.setdefault(key, (saved_group[key], built_group[key]))


def log_changes(engine, source, changed: dict) -> None:
    if engine.rank != 0:
        return
    for key, (saved, config) in sorted(changed.items()):
        logger.info("optimizer.params.%s: %r from the config, not %r from %s", key, config, saved, source.description)
