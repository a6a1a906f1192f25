"""Activation memory of one micro-batch, traced rather than guessed: the model runs forward and
backward in FakeTensorMode (tensors with shapes, dtypes and storages but no memory), and what
is counted is storages, each once however many tensors view it; parameters and buffers are not
activations (they are counted as params).

- saved: what autograd saves for backward (a saved_tensors_hooks pack hook), and the output.
- peak: the most bytes alive at once over forward and backward (a dispatch mode registers every
  storage an op creates, and a weakref finalizer on the storage sees it freed): the saved tensors
  and the largest transient (forward's temporaries, backward's gradients of activations).
  Parameter gradients are freed as they land, as memfit moves each into its bucket.
- per block (the blocks memfit.checkpoint_blocks selects; "auto" when none is set, for
  comparison): its inputs and what it saves. With checkpointing a block keeps only its inputs
  and backward rebuilds one block's saved tensors at a time: what is kept is what is saved
  outside the blocks and the blocks' inputs, and the largest block's own saved tensors come back
  during backward. The peak with checkpointing comes from a second trace with the blocks under
  torch's non-reentrant checkpoint, as memfit wraps them.

cpu_checkpointing keeps the blocks' inputs in host memory when the model runs off the CPU; on the
CPU every figure is RAM. The trace runs on the CPU kernels: attention is torch's fused CPU kernel,
which saves what the CUDA flash and memory-efficient kernels save (q, k, v, the output and a
logsumexp), so a CUDA run differs by their small per-kernel extras. The loss is the script's and
is not traced (a language model's cross entropy on fp32 logits adds about two batch x sequence x
vocabulary fp32 tensors).

Inputs: a model may say what one micro-batch is with a method memfit_example_inputs(micro_batch_size,
seq_len=None) returning the positional inputs (a tensor or a tuple), created on the device of its
parameters; without one, a model whose first layer is an Embedding (token ids, needs a sequence
length) or a Linear (features) gets zeros of that shape, and any other has no estimate.
"""

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memfit.units import format_bytes

HINT = "memfit_example_inputs"

logger = logging.getLogger("memfit")


@dataclass
class ActivationEstimate:
    """Bytes of one micro-batch's activations on one rank (every rank of a data-parallel run has
    the same). Storages are counted once however many tensors view them."""

    saved_bytes: int  # without checkpointing: what forward leaves for backward, the output included
    peak_bytes: int  # without checkpointing: the most alive at once, forward or backward
    checkpoint_kept_bytes: int = 0  # with checkpointing: saved outside the blocks, and the blocks' inputs
    block_inputs_bytes: int = 0  # the blocks' inputs (in checkpoint_kept_bytes; host memory under cpu_checkpointing)
    recompute_bytes: int = 0  # the largest block's saved tensors beyond its inputs, rebuilt in its backward
    checkpoint_peak_bytes: int = 0  # with checkpointing: the most alive at once, rebuilt blocks included
    num_blocks: int = 0  # blocks checkpointing wraps (0: no block found, no checkpointed figure)
    first_block: str = ""
    inputs: str = ""  # what one micro-batch was, as "(8, 256) int64 (the model's memfit_example_inputs)"
    notes: list[str] = field(default_factory=list)

    def total_bytes(self, checkpointed: bool) -> int:
        """The most one micro-batch's activations take at once."""
        return self.checkpoint_peak_bytes if checkpointed and self.num_blocks else self.peak_bytes

    def kept_bytes(self, checkpointed: bool) -> int:
        """What forward leaves for backward."""
        return self.checkpoint_kept_bytes if checkpointed and self.num_blocks else self.saved_bytes

    def tiers(self, checkpointed: bool, cpu_checkpointing: bool, device_type: str) -> dict[str, int]:
        """{"device", "host"} bytes: everything where the model runs, except the blocks' inputs
        under cpu_checkpointing off the CPU; on the CPU all of it is host memory."""
        total = self.total_bytes(checkpointed)
        if device_type == "cpu":
            return {"device": 0, "host": total}
        if checkpointed and self.num_blocks and cpu_checkpointing:
            return {"device": total - self.block_inputs_bytes, "host": self.block_inputs_bytes}
        return {"device": total, "host": 0}


def has_hint(model: torch.nn.Module) -> bool:
    return callable(getattr(model, HINT, None))


def host_check_activations(model: torch.nn.Module, cfg, micro_batch_size: int, device_type: str):
    """For initialize's host-memory check: the {"device", "host"} bytes of one micro-batch's
    activations as the config runs them, or None (with a logged line) where they are not known.
    Only a model that says what its micro-batch is (memfit_example_inputs) is traced: the check
    must never refuse a run on a guessed input."""
    if not has_hint(model):
        logger.info("host memory check: activations not counted (the model has no %s method)", HINT)
        return None
    blocks = cfg.memfit.checkpoint_blocks
    try:
        traced = trace_model(model, micro_batch_size, blocks)
    except ValueError as error:
        logger.info("host memory check: activations not counted: %s", error)
        return None
    checkpointed = blocks is not None and traced.num_blocks > 0
    tiers = traced.tiers(checkpointed, cfg.activation_checkpointing.cpu_checkpointing, device_type)
    logger.info(
        "host memory check: one micro-batch's activations (%s): %s of host memory per rank",
        traced.inputs,
        format_bytes(tiers["host"]),
    )
    return tiers


def trace_model(
    model: torch.nn.Module,
    micro_batch_size: int,
    blocks_spec=None,
    seq_len: int | None = None,
    compute_dtype: torch.dtype | None = None,
    device: str | None = None,
) -> ActivationEstimate:
    """The estimate for a model (real, or built on the meta device): for the trace its parameters,
    buffers and inputs are fake tensors of the same shapes, floating ones in compute_dtype and all
    on device where given (as model.to would make them), and nothing is allocated. A ValueError
    says why there is none (no inputs known, a forward that cannot run on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def like(tensor):
        dtype = compute_dtype if compute_dtype is not None and tensor.is_floating_point() else tensor.dtype
        return torch.zeros(tensor.shape, dtype=dtype, device=device or tensor.device)

    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = {}  # id of a parameter or buffer -> its fake; a tied tensor stays one tensor
        for tensor in [*model.parameters(), *model.buffers()]:
            fakes[id(tensor)] = torch.nn.Parameter(like(tensor)) if tensor.requires_grad else like(tensor)
        inputs, source = example_inputs(model, micro_batch_size, seq_len)
        inputs = tuple(like(value) if torch.is_tensor(value) else value for value in inputs)
        description = ", ".join(_describe(value) for value in inputs) + f" ({source})"
        with _swapped(model, fakes):  # for forward and backward, which may run blocks again
            return _trace(model, model, inputs, list(fakes.values()), blocks_spec, description)


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, replacements: dict[int, torch.Tensor]):
    """The model's parameters and buffers replaced (by the id of each) for the time of the block."""
    originals = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            originals += [(table, name, t) for name, t in table.items() if t is not None and id(t) in replacements]
    for table, name, tensor in originals:
        table[name] = replacements[id(tensor)]
    try:
        yield
    finally:
        for table, name, tensor in originals:
            table[name] = tensor


def trace_factory(factory, compute_dtype, micro_batch_size: int, blocks_spec=None, seq_len: int | None = None):
    """The estimate for the model a factory builds (on the meta device), traced on the CPU's
    kernels in compute_dtype (None: as built)."""
    with torch.device("meta"):
        model = factory()
    return trace_model(model, micro_batch_size, blocks_spec, seq_len, compute_dtype, device="cpu")


def example_inputs(model: torch.nn.Module, micro_batch_size: int, seq_len: int | None) -> tuple[tuple, str]:
    """(positional inputs of one micro-batch, where they come from): the model's own hint, or zeros
    for a model whose first layer is an Embedding or a Linear."""
    if has_hint(model):
        inputs = getattr(model, HINT)(micro_batch_size, seq_len)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        return inputs, f"the model's {HINT}"
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, torch.nn.Embedding):
        if seq_len is None:
            raise ValueError("the first layer is an Embedding: give a sequence length (--seq-len)")
        tokens = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device=first.weight.device)
        return (tokens,), "token ids for the first Embedding"
    if isinstance(first, torch.nn.Linear):
        sequence = () if seq_len is None else (seq_len,)
        shape = (micro_batch_size, *sequence, first.in_features)
        features = torch.zeros(shape, dtype=first.weight.dtype, device=first.weight.device)
        return (features,), "features for the first Linear"
    raise ValueError(
        f"no input known: give the model a method {HINT}(micro_batch_size, seq_len=None) returning one micro-batch"
    )


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


class _LiveStorages(TorchDispatchMode):
    """Every storage an op creates while the trace runs, alive until its last tensor goes; each
    gets a serial number (a storage's address may be reused once it is freed). An op's output
    that views one of its inputs (a transposed weight, an in-place result) creates nothing."""

    def __init__(self):
        super().__init__()
        self.serial_of: dict[int, int] = {}  # storage address -> serial, while alive
        self.nbytes: dict[int, int] = {}  # serial -> bytes
        self.saved: set[int] = set()  # serials autograd saved, and the output's
        self.live_bytes = 0
        self.peak_bytes = 0
        self.next_serial = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for tensor in tree_leaves(out):
            if torch.is_tensor(tensor) and _address(tensor) is not None:
                self.track(tensor, created=_address(tensor) not in inputs)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def track(self, tensor, created: bool = False) -> int:
        """The serial of tensor's storage; one not seen before counts as alive if an op created it."""
        storage = tensor.untyped_storage()
        address = storage._cdata
        if address in self.serial_of:
            return self.serial_of[address]
        serial = self.next_serial
        self.next_serial += 1
        self.serial_of[address] = serial
        self.nbytes[serial] = storage.nbytes()
        if created:
            self.live_bytes += storage.nbytes()
        weakref.finalize(storage, self._free, address, serial, created)
        return serial

    def _free(self, address: int, serial: int, created: bool) -> None:
        if self.serial_of.get(address) == serial:
            del self.serial_of[address]
        if created:
            self.live_bytes -= self.nbytes[serial]


def _trace(model, run, inputs, model_tensors, blocks_spec, description) -> ActivationEstimate:
    """Forward and backward of run(*inputs) under fake tensors, counted as the module says: once
    as the model is, and where it has blocks once more with them checkpointed."""
    from memfit.runtime.activation_checkpointing import blocks_to_checkpoint

    notes = []
    try:
        blocks = blocks_to_checkpoint(model, blocks_spec or "auto")
    except ValueError as error:  # nothing to checkpoint: one variant only
        blocks = []
        if blocks_spec is not None:
            notes.append(str(error))
    owned = {_address(t) for t in model_tensors} | {None}  # not activations, or no storage to count
    live = _LiveStorages()
    outside: set[int] = set()
    per_block: list[set[int]] = [set() for _ in blocks]
    block_inputs: set[int] = set()
    current: list[int] = []

    def pack(tensor):
        if _address(tensor) not in owned:
            serial = live.track(tensor)
            live.saved.add(serial)
            (per_block[current[-1]] if current else outside).add(serial)
        return tensor

    def enter(index):
        def hook(module, args, kwargs):
            for tensor in tree_leaves((args, kwargs)):
                if torch.is_tensor(tensor) and _address(tensor) not in owned:
                    block_inputs.add(live.track(tensor))
            current.append(index)

        return hook

    def leave(module, args, output):
        current.pop()

    def keep_output(output):
        for tensor in tree_leaves(output):
            if torch.is_tensor(tensor) and _address(tensor) not in owned:
                serial = live.track(tensor)
                live.saved.add(serial)
                outside.add(serial)

    handles = []
    for index, (_, block) in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            notes += _forward_backward(run, inputs, model_tensors, live, keep_output)
    finally:
        for handle in handles:
            handle.remove()
    saved_bytes = sum(live.nbytes[serial] for serial in live.saved)
    estimate = ActivationEstimate(
        saved_bytes=saved_bytes, peak_bytes=max(live.peak_bytes, saved_bytes), inputs=description, notes=notes
    )
    if blocks:
        kept = outside | block_inputs
        estimate.num_blocks, estimate.first_block = len(blocks), blocks[0][0]
        estimate.checkpoint_kept_bytes = sum(live.nbytes[serial] for serial in kept)
        estimate.block_inputs_bytes = sum(live.nbytes[serial] for serial in block_inputs)
        estimate.recompute_bytes = max(sum(live.nbytes[serial] for serial in own - kept) for own in per_block)
        checkpointed = _LiveStorages()
        try:
            with _checkpointing([block for _, block in blocks]):
                _forward_backward(run, inputs, model_tensors, checkpointed, lambda output: None)
            estimate.checkpoint_peak_bytes = max(checkpointed.peak_bytes, estimate.checkpoint_kept_bytes)
        except ValueError as error:  # what is kept, one block rebuilt, and the transient seen without
            transient = estimate.peak_bytes - saved_bytes
            estimate.checkpoint_peak_bytes = estimate.checkpoint_kept_bytes + estimate.recompute_bytes + transient
            estimate.notes.append(f"checkpointed blocks not traced ({error}): their peak is added up")
    return estimate


def _forward_backward(run, inputs, model_tensors, live: _LiveStorages, after_forward) -> list[str]:
    """One forward, after_forward(output), one backward from the output's sum, every op under
    live; parameter gradients are freed as they land (memfit moves each into its bucket)."""
    notes = []
    handles = [t.register_post_accumulate_grad_hook(_drop_grad) for t in model_tensors if t.requires_grad]
    try:
        with live:
            try:
                output = run(*inputs)
            except Exception as error:
                raise ValueError(f"the forward did not run on fake tensors: {type(error).__name__}: {error}") from None
            after_forward(output)
            # the output stays alive through backward, as a training loop's logits do
            losses = [t.sum() for t in tree_leaves(output) if torch.is_tensor(t) and t.requires_grad]
            if losses:
                try:
                    torch.autograd.backward(losses)
                except Exception as error:
                    notes.append(f"backward did not run on fake tensors ({type(error).__name__}): forward only")
            else:
                notes.append("the output needs no gradient: forward only")
            del output, losses
    finally:
        for handle in handles:
            handle.remove()
    return notes


def _address(tensor) -> int | None:
    """The identity of tensor's storage (None for a tensor without one, as a sparse tensor)."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _drop_grad(param) -> None:
    param.grad = None


@contextlib.contextmanager
def _checkpointing(blocks):
    """The blocks' forwards checkpointed as memfit.checkpoint_blocks makes them (torch's
    non-reentrant checkpoint), for the time of one trace."""
    from torch.utils.checkpoint import checkpoint

    own = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def describe(estimate: ActivationEstimate, checkpointed: bool, cpu_checkpointing: bool, device_type: str) -> list[str]:
    """Lines for `memfit estimate`: the configured variant, then the other one for comparison."""
    lines = []
    variants = [checkpointed, not checkpointed] if estimate.num_blocks else [False]
    for index, variant in enumerate(variants):
        tiers = estimate.tiers(variant, cpu_checkpointing and variant, device_type)
        if device_type == "cpu":
            where = "host memory: on the CPU, device and host are the same RAM"
        else:
            where = f"device {format_bytes(tiers['device'])}, host {format_bytes(tiers['host'])}"
        if variant:
            kind = (
                f"with checkpointing of {estimate.num_blocks} blocks ({estimate.first_block}, ...): "
                f"{format_bytes(estimate.checkpoint_kept_bytes)} kept after forward "
                f"({format_bytes(estimate.block_inputs_bytes)} of it the blocks' inputs), "
                f"{format_bytes(estimate.recompute_bytes)} rebuilt for one block in backward"
            )
        else:
            kind = f"without checkpointing: {format_bytes(estimate.saved_bytes)} saved for backward"
        label = "activations per rank (every rank the same)" if index == 0 else "  for comparison,"
        lines.append(f"{label} {kind}; at most {format_bytes(estimate.total_bytes(variant))} ({where})")
    return lines
