"""Activation checkpointing: a block's forward keeps only its inputs; backward runs the block
again to rebuild what it needs (torch's non-reentrant checkpoint, so keyword arguments, outputs
that do not need gradients and nested modules all work, and the recomputed values are the first
ones bit for bit on the CPU).

Which blocks. memfit.checkpoint_blocks names them: "auto" is the children of the model's largest
ModuleList (a transformer's layers), a list names block classes. A script may instead call
memfit.deepspeed.checkpointing.checkpoint(function, *args) itself, as Megatron-style code does.

cpu_checkpointing (DeepSpeed's key) keeps the saved block inputs in host memory when the model
runs on a GPU; on the CPU they are there already. memfit.activation_offload "nvme" keeps them in
a swap file instead (memfit/offload/activation_swap.py): the block then runs as a function of
its own (_SwappedCheckpoint), which keeps no reference to its tensor inputs that need gradients
(the block inputs), only their copies on NVMe, and runs the block again in its backward from the
copies read back, with the RNG state of the first run."""

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from memfit.runtime.zero.stage3 import gathering_on_use

logger = logging.getLogger("memfit")


def checkpoint(function, *args, keep_inputs_on_host: bool = False, swap=None, **kwargs):
    """function(*args, **kwargs), keeping for backward only what it was given (swap: an
    ActivationSwap that keeps the inputs needing gradients on NVMe). At ZeRO stage 3 the run in
    backward gathers the tensors it uses, as the first one did."""
    run = functools.partial(_gathering, function)
    if swap is not None:
        if any(torch.is_tensor(value) for value in kwargs.values()):
            raise ValueError(
                "memfit.activation_offload: a checkpointed block took a tensor as a keyword argument; pass tensors "
                "positionally, or leave activation_offload off"
            )
        return _SwappedCheckpoint.apply(swap, functools.partial(run, **kwargs), *args)
    if keep_inputs_on_host and any(torch.is_tensor(a) and a.device.type != "cpu" for a in args):
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)
    return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)


def _gathering(function, *args, **kwargs):
    with gathering_on_use():
        return function(*args, **kwargs)


class _SwappedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, swap, run, *args):
        ctx.swap, ctx.run = swap, run
        ctx.rng_state = torch.get_rng_state()
        ctx.devices = sorted({a.device.index for a in args if torch.is_tensor(a) and a.device.type == "cuda"})
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.inputs, kept_in_memory = [], []
        for arg in args:
            if torch.is_tensor(arg) and arg.requires_grad:
                ctx.inputs.append(("swap", swap.put(arg)))
            elif torch.is_tensor(arg):
                ctx.inputs.append(("saved", len(kept_in_memory)))
                kept_in_memory.append(arg)
            else:
                ctx.inputs.append(("value", arg))
        ctx.save_for_backward(*kept_in_memory)
        with torch.no_grad():
            outputs = run(*args)
        if not torch.is_tensor(outputs) and not (
            isinstance(outputs, tuple) and all(torch.is_tensor(o) or o is None for o in outputs)
        ):
            raise TypeError(
                "memfit.activation_offload: a checkpointed block must return a tensor or a tuple of tensors, "
                f"got {type(outputs).__name__}"
            )
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = ctx.saved_tensors
        inputs = []
        for kind, value in ctx.inputs:
            if kind == "swap":
                inputs.append(ctx.swap.take(value).requires_grad_(True))
            elif kind == "saved":
                inputs.append(saved[value].detach().requires_grad_(saved[value].requires_grad))
            else:
                inputs.append(value)
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.rng_state)
            for device, state in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, device)
            with torch.enable_grad():
                outputs = ctx.run(*inputs)
        outputs = (outputs,) if torch.is_tensor(outputs) else outputs
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [i.grad if torch.is_tensor(i) and kind != "value" else None for i, (kind, _) in zip(inputs, ctx.inputs)]
        return (None, None, *grads)


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


def wrap_blocks(model: torch.nn.Module, spec, keep_inputs_on_host: bool, swap=None) -> list[str]:
    """Makes each selected block's forward a checkpointed one; returns the blocks' names. swap:
    where the blocks' kept inputs go (memfit.activation_offload)."""
    chosen = blocks_to_checkpoint(model, spec)
    for _, block in chosen:
        forward = block.forward
        block.forward = functools.partial(_checkpointed, forward, keep_inputs_on_host, swap)
    logger.info("activation checkpointing: %d blocks (%s ...)", len(chosen), chosen[0][0])
    return [name for name, _ in chosen]


def _checkpointed(forward, keep_inputs_on_host, swap, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing is kept anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, keep_inputs_on_host=keep_inputs_on_host, swap=swap, **kwargs)
