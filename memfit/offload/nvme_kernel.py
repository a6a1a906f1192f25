"""The update phase under offload_optimizer "nvme": fp32 masters and optimizer state of the
tensors a rank owns live in its swap file (swap_space.py) and are streamed through host memory
at each step. Compute parameters and gradients stay where the model runs.

NvmeKernelUpdate (Adam, AdamW, CPUAdamW): the owned tensors are cut into sub-groups that fit one
ring buffer (plan_subgroups; a tensor larger than a buffer is split). With buffer_count buffers
the step reads sub-group k+1, runs the fused kernel on k and writes k-1 at the same time;
pipeline_read=false reads each sub-group only when it is due, pipeline_write=false waits for each
write. The kernel is elementwise and computes the same bits at every split, so the result equals
the host tier's bit for bit. State is created on a tensor's first step in the buffer (master
from the parameter, zero moments), as CPUAdamW creates it; nothing is read before it was written.

NvmeOptimizerUpdate (GaLoreAdamW, FRUGAL, SGD, any torch optimizer): their state is created by
torch, so it moves whole: sub-groups of whole tensors; for each, the masters and state tensors
are read into host tensors, the optimizer's step() runs with only that sub-group's gradients
present, and they are written back and dropped. Group-level values the step changes (FRUGAL's
step counter and window) are restored before every sub-group's call, and what a call does to the
state of tensors outside its sub-group is undone after it, so each call is the same step for its
own tensors and the result equals one step() over all of them. Between steps a master
is a stride-0 placeholder of its shape (its numel and dtype stay right, its values are on NVMe).

Both expose the hooks the checkpoint code uses to stream state tensor by tensor:
swapped_tensors() {name: {key: tensor over the swap file}}, restore_state(name, tensors),
restore_master(name, value) (NvmeOptimizerUpdate), adopt(optimizer); and bytes_in_use (host) and
swap_bytes for memory_report.
"""

import torch

from memfit.io import HostArena
from memfit.io.extents import align_up
from memfit.offload.host_tier import stages_through_host
from memfit.offload.streamed_step import StoredGradient
from memfit.offload.swap_space import ALIGN_ELEMENTS, SwapSpace, check_pipeline, plan_subgroups
from memfit.optim.cpu_adam import CPUAdamW, check_hyperparameters, group_constants
from memfit.optim.fused_adam import GRAD_DTYPES, step_tensors

MOMENTS = ("exp_avg", "exp_avg_sq")


def kernel_kinds(param: torch.Tensor) -> tuple[str, ...]:
    """The fp32 tensors the kernel keeps per parameter: a master unless the parameter is an fp32
    tensor the kernel updates in place (on the CPU, not staged: see stages_through_host)."""
    own_master = param.dtype == torch.float32 and not stages_through_host(param.device)
    return MOMENTS if own_master else ("master", *MOMENTS)


def kernel_swap_bytes(params) -> int:
    return sum(len(kernel_kinds(p)) * align_up(max(4 * p.numel(), 1)) for p in params)


def optimizer_swap_bytes(numels: list[int], reduced: bool, state_bytes: int) -> int:
    """Swap for torch-made state: masters, the planned state, room for 4 KiB rounding of up to
    three state tensors per parameter and an eighth for state that changes size (FRUGAL)."""
    masters = sum(align_up(max(4 * n, 1)) for n in numels) if reduced else 0
    return masters + state_bytes + state_bytes // 8 + 3 * 4096 * len(numels)


class StreamedAdamW(CPUAdamW):
    """CPUAdamW whose masters and moments live in the NVMe tier: its state holds the step count
    only, and step() runs the streamed step of the NvmeKernelUpdate that owns it."""

    stream = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.stream is not None and self.stream.streamed is not None:
            self.stream.streamed.discard()  # gradients resting in the swap file are dropped too
        super().zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """CPUAdamW's checks, less its device check: the streamed step copies gradients of a model
        off the CPU to the host and the updated weights back."""
        torch.optim.Optimizer.add_param_group(self, param_group)
        group = self.param_groups[-1]
        try:
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for param_index, param in enumerate(group["params"]):
                if param.dtype not in GRAD_DTYPES or not param.is_contiguous():
                    raise ValueError(
                        f"params: parameter {param_index} of group {len(self.param_groups) - 1} is {param.dtype}"
                        f"{'' if param.is_contiguous() else ', not contiguous'}; the kernel steps contiguous "
                        "fp32, bf16 and fp16 tensors"
                    )
        except ValueError:
            self.param_groups.pop()
            raise
        group["betas"] = tuple(group["betas"])

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float = 1.0):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.stream is None:
            raise RuntimeError("StreamedAdamW steps inside an engine with offload_optimizer nvme; use CPUAdamW alone")
        self.stream.run(grad_scale)
        return loss

    def master_of(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.stream.read_master(param)

    def set_master(self, param: torch.Tensor, value: torch.Tensor) -> None:
        self.stream.write_whole(self.stream.index_of[id(param)], "master", value)


class NvmeKernelUpdate:
    def __init__(self, optimizer: StreamedAdamW, named_params, space: SwapSpace, offload):
        self.optimizer, self.space = optimizer, space
        optimizer.stream = self
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.index_of = {id(param): index for index, param in enumerate(self.params)}
        self.kinds = [kernel_kinds(param) for param in self.params]
        self.staged = [stages_through_host(param.device) for param in self.params]
        self.stored: list[set[str]] = [set() for _ in self.params]  # kinds whose values are on the swap
        for name, param, kinds in zip(self.names, self.params, self.kinds):
            for kind in kinds:
                space.swap.reserve(f"{name}/{kind}", torch.float32, (param.numel(),))
        buffer_elements = offload.buffer_size // 4 // ALIGN_ELEMENTS * ALIGN_ELEMENTS
        self.groups = plan_subgroups([p.numel() for p in self.params], [len(k) for k in self.kinds], buffer_elements)
        num_buffers = max(1, min(offload.buffer_count, len(self.groups)))
        self.arena = HostArena(
            num_buffers * buffer_elements * 4, register_cuda=offload.pin_memory and torch.cuda.is_available()
        )
        self.ring = [self.arena.alloc((buffer_elements,), torch.float32) for _ in range(num_buffers)]
        self.pipeline_read = check_pipeline(offload.buffer_count, offload.pipeline_read) and num_buffers >= 2
        self.pipeline_write = offload.pipeline_write
        # stage 3 with everything on NVMe: 16-bit weights and gradients rest in the parameter swap file, and the
        # update reads them per sub-group (streamed_step.py; set by the build)
        self.streamed = None

    # ---- the update interface (see interface.py) ---------------------------------------------------
    def gradients(self, touched_ids: set[int]) -> list:
        """The step's gradients, in parameter order: tensors, and StoredGradient for the ones in
        the swap file. There, a .grad without backward (assigned by hand) counts, as torch's."""
        streamed = self.streamed
        if streamed is not None:
            streamed.reconcile()
            streamed.updated_in_backward()  # updated already: no gradient left for the step
        grads = []
        for param in self.params:
            if streamed is not None and streamed.has_grad(param):
                grads.append(streamed.stored[id(param)])
            elif param.grad is not None and (
                id(param) in touched_ids or (streamed is not None and streamed.takes_from_backward)
            ):
                grads.append(param.grad)
            else:
                param.grad = None
        return grads

    def nonfinite(self, grads: list) -> bool:
        return any(
            not grad.is_finite() if isinstance(grad, StoredGradient) else not bool(torch.isfinite(grad).all())
            for grad in grads
        )

    def apply(self, multiplier: torch.Tensor | None) -> None:
        self.optimizer.step(grad_scale=1.0 if multiplier is None else float(multiplier))
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def master_bytes(self) -> int:
        return sum(4 * p.numel() for p, stored in zip(self.params, self.stored) if "master" in stored)

    @property
    def state_bytes(self) -> int:
        return sum(8 * p.numel() for p, stored in zip(self.params, self.stored) if "exp_avg" in stored)

    @property
    def bytes_in_use(self) -> int:
        return self.arena.bytes_in_use

    @property
    def swap_bytes(self) -> int:
        """What the rank's swap file takes on disk (preallocated at start)."""
        return self.space.capacity_bytes

    @property
    def swap_transferred_bytes(self) -> tuple[int, int]:
        """(bytes read, bytes written) through the rank's swap file so far."""
        return self.space.transferred_bytes

    # ---- the streamed step ----------------------------------------------------------------------
    def run(self, grad_scale: float) -> None:
        constants, row_key = {}, {}
        for group_index, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                index = self.index_of.get(id(param))
                if index is None or (param.grad is None and not self._in_stream(index)):
                    continue
                state = self.optimizer.state[param]
                state["step"] = state.get("step", 0) + 1
                key = (group_index, state["step"])
                row_key[index] = key
                if key not in constants:
                    constants[key] = group_constants(group, state["step"], grad_scale)
        run = [[piece for piece in group if piece.index in row_key] for group in self.groups]
        run = [pieces for pieces in run if pieces]
        grads = {index: _dense_cpu(self.params[index].grad) for index in row_key if not self._in_stream(index)}
        self._stream(run, grads, row_key, constants)
        for index in row_key:
            self.stored[index].update(self.kinds[index])
        touched = [self.params[index] for index in row_key]
        if touched:
            torch.autograd.graph.increment_version(touched)  # written through raw pointers

    def _in_stream(self, index: int) -> bool:
        """Whether the tensor's weights and gradient are read from the parameter swap file."""
        return self.streamed is not None and self.streamed.has_grad(self.params[index])

    def _start_bring(self, pieces) -> None:
        for piece in pieces:
            if self._in_stream(piece.index):
                self.streamed.start_bring(self.params[piece.index])

    def _bring(self, pieces, grads) -> None:
        for piece in pieces:
            if self._in_stream(piece.index):
                grads[piece.index] = self.streamed.bring(self.params[piece.index])

    def _put_back(self, pieces, grads) -> None:
        for piece in pieces:
            param = self.params[piece.index]
            if piece.stop == param.numel() and self._in_stream(piece.index):
                self.streamed.put_back(param)
                del grads[piece.index]

    def _views(self, buffer, piece):
        count = piece.stop - piece.start
        return {
            kind: buffer[piece.buffer_offset + k * piece.width : piece.buffer_offset + k * piece.width + count]
            for k, kind in enumerate(self.kinds[piece.index])
        }

    def _start_reads(self, pieces, buffer) -> list:
        requests = []
        for piece in pieces:
            stored = self.stored[piece.index]
            for kind, view in self._views(buffer, piece).items():
                if kind in stored:
                    slot = f"{self.names[piece.index]}/{kind}"
                    requests.append((self.space.read(slot, view, piece.start), slot))
        return requests

    def _stream(self, run, grads, row_key, constants) -> None:
        num_buffers = len(self.ring)
        writes = [[] for _ in range(num_buffers)]  # per buffer: the writes of the sub-group it held
        reads = {}
        try:
            for position, pieces in enumerate(run):
                buffer = self.ring[position % num_buffers]
                if position not in reads:
                    self.space.wait(writes[position % num_buffers], "writing")
                    writes[position % num_buffers] = []
                    reads[position] = self._start_reads(pieces, buffer)
                following = position + 1
                if self.pipeline_read and following < len(run):
                    self.space.wait(writes[following % num_buffers], "writing")
                    writes[following % num_buffers] = []
                    reads[following] = self._start_reads(run[following], self.ring[following % num_buffers])
                    self._start_bring(run[following])
                self.space.wait(reads.pop(position), "reading")
                self._bring(pieces, grads)
                writes[position % num_buffers] = self._update(pieces, buffer, grads, row_key, constants)
                self._put_back(pieces, grads)
                if not self.pipeline_write:
                    self.space.wait(writes[position % num_buffers], "writing")
                    writes[position % num_buffers] = []
        finally:
            try:
                self.space.wait([request for requests in reads.values() for request in requests], "reading")
            finally:
                if self.streamed is not None:
                    self.streamed.drop_brought()  # left only by a failed step
                self.space.wait([request for requests in writes for request in requests], "writing")

    def _update(self, pieces, buffer, grads, row_key, constants) -> list:
        batches: dict[tuple, list] = {}
        copies = []  # (compute piece off the CPU, its fp32 master piece)
        for piece in pieces:
            index = piece.index
            param = self.params[index].detach().view(-1)[piece.start : piece.stop]
            views = self._views(buffer, piece)
            stored = self.stored[index]
            if "exp_avg" not in stored:
                views["exp_avg"].zero_()
                views["exp_avg_sq"].zero_()
            if "master" in views and "master" not in stored:
                views["master"].copy_(param)
            grad = grads[index].view(-1)[piece.start : piece.stop]
            if self.staged[index]:  # the master crosses back to the compute parameter after the kernel
                master, out = views["master"], None
                copies.append((param, master))
            elif "master" in views:
                master, out = views["master"], param
            else:
                master, out = param, None
            key = (*row_key[index], grad.dtype, None if out is None else out.dtype)
            batches.setdefault(key, []).append((master, grad, views["exp_avg"], views["exp_avg_sq"], out))
        for key, rows in batches.items():
            step_tensors(rows, constants[key[:2]])
        for param, master in copies:
            param.copy_(master)  # blocking: the ring buffer is read into again soon
        requests = []
        for piece in pieces:
            for kind, view in self._views(buffer, piece).items():
                slot = f"{self.names[piece.index]}/{kind}"
                requests.append((self.space.write(slot, view, piece.start), slot))
        return requests

    # ---- whole tensors: checkpoints -------------------------------------------------------------
    def write_whole(self, index: int, kind: str, value: torch.Tensor) -> None:
        if kind not in self.kinds[index]:
            return  # an fp32 CPU parameter is its own master
        value = value.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        if value.numel() != self.params[index].numel():
            raise ValueError(
                f"{self.names[index]}: {kind} has {value.numel()} elements, the parameter has "
                f"{self.params[index].numel()}"
            )
        slot = f"{self.names[index]}/{kind}"
        self.space.wait([(self.space.write(slot, value), slot)], "writing")
        self.stored[index].add(kind)

    def read_master(self, param: torch.Tensor) -> torch.Tensor | None:
        index = self.index_of.get(id(param))
        if index is None or "master" not in self.stored[index]:
            return None
        value = torch.empty(param.shape, dtype=torch.float32)
        slot = f"{self.names[index]}/master"
        self.space.wait([(self.space.read(slot, value.view(-1)), slot)], "reading")
        return value

    def swapped_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        slots = [f"{name}/{kind}" for name, stored in zip(self.names, self.stored) for kind in sorted(stored)]
        views = self.space.views(slots)
        return {
            name: {kind: views[f"{name}/{kind}"].view(param.shape) for kind in stored}
            for name, param, stored in zip(self.names, self.params, self.stored)
        }

    def restore_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        index = self.names.index(name)
        unknown = sorted(set(tensors) - set(MOMENTS))
        if unknown:
            raise ValueError(f"{name}: optimizer state {unknown} is not Adam's (exp_avg, exp_avg_sq)")
        self.stored[index] -= set(MOMENTS)
        if tensors:
            for kind in MOMENTS:
                if kind not in tensors:
                    raise ValueError(f"{name}: the saved optimizer state has no {kind}")
                self.write_whole(index, kind, tensors[kind])

    def adopt(self, optimizer) -> None:
        """Moves any tensor state a load put in RAM into the swap file."""
        for param, state in optimizer.state.items():
            index = self.index_of.get(id(param))
            for key in [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]:
                if index is not None:
                    self.write_whole(index, key, state[key])
                del state[key]


def _dense_cpu(grad: torch.Tensor) -> torch.Tensor:
    if grad.device.type != "cpu":
        grad = grad.to("cpu")
    return grad if grad.is_contiguous() else grad.contiguous()
