"""Activation checkpointing: a block's forward keeps only its inputs; backward runs the block
again to rebuild what it needs (torch's non-reentrant checkpoint, so keyword arguments, outputs
that do not need gradients and nested modules all work, and the recomputed values are the first
ones bit for bit on the CPU).

Which blocks. memfit.checkpoint_blocks names them: "auto" is the children of the model's largest
ModuleList (a transformer's layers), a list names block classes. A script may instead call
memfit.deepspeed.checkpointing.checkpoint(function, *args) itself, as Megatron-style code does.

cpu_checkpointing (DeepSpeed's key) keeps the saved block inputs in host memory when the model
runs on a GPU; on the CPU they are there already."""

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from memfit.runtime.zero.stage3 import gathering_on_use

logger = logging.getLogger("memfit")


def checkpoint(function, *args, keep_inputs_on_host: bool = False, **kwargs):
    """function(*args, **kwargs), keeping for backward only what it was given. At ZeRO stage 3 the
    run in backward gathers the tensors it uses, as the first one did."""
    run = functools.partial(_gathering, function)
    if keep_inputs_on_host and any(torch.is_tensor(a) and a.device.type != "cpu" for a in args):
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)
    return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)


def _gathering(function, *args, **kwargs):
    with gathering_on_use():
        return function(*args, **kwargs)


def blocks_to_checkpoint(model: torch.nn.Module, spec) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the blocks spec selects; a ValueError naming the setting when none."""
    if spec == "auto":
        lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError('memfit.checkpoint_blocks: "auto" found no ModuleList in the model; name block classes')
        name, largest = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
        return [(f"{name}.{index}" if name else str(index), block) for index, block in enumerate(largest)]
    wanted = set(spec)
    found = [(name, m) for name, m in model.named_modules() if type(m).__name__ in wanted]
    outermost = [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]
    missing = wanted - {type(m).__name__ for _, m in found}
    if missing:
        raise ValueError(f"memfit.checkpoint_blocks: no module of class {sorted(missing)} in the model")
    return outermost


def wrap_blocks(model: torch.nn.Module, spec, keep_inputs_on_host: bool) -> list[str]:
    """Makes each selected block's forward a checkpointed one; returns the blocks' names."""
    chosen = blocks_to_checkpoint(model, spec)
    for _, block in chosen:
        forward = block.forward
        block.forward = functools.partial(_checkpointed, forward, keep_inputs_on_host)
    logger.info("activation checkpointing: %d blocks (%s ...)", len(chosen), chosen[0][0])
    return [name for name, _ in chosen]


def _checkpointed(forward, keep_inputs_on_host, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing is kept anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, keep_inputs_on_host=keep_inputs_on_host, **kwargs)
