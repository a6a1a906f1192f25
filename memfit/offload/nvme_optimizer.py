"""NvmeOptimizerUpdate: the NVMe tier for optimizers whose state torch creates (GaLoreAdamW,
FRUGAL, SGD, a client optimizer); see nvme_kernel.py for the design and the kernel path.

Per sub-group of whole tensors (fp32 bytes of masters and two moments within buffer_size; a
larger tensor is a sub-group of its own): read the masters and the state tensors (tensors of at least one dimension;
scalar step counters stay in RAM), run
step() with only the sub-group's gradients present, copy the masters into the compute
parameters, write masters and state back and let go of them. With pipeline_read the next
sub-group is read while one steps; with pipeline_write at most buffer_count sub-groups' writes
are in flight.
"""

import torch

from memfit.offload.host_tier import stages_through_host
from memfit.offload.masters import MasterWeights
from memfit.offload.streamed_step import StoredGradient
from memfit.offload.swap_space import SwapSpace, check_pipeline


def _swappable(value) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.device.type == "cpu"


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of tensor's shape and dtype over one element: numel() and shape stay true for
    code that reads them (FRUGAL sizes its windows by bytes) while the values live on NVMe."""
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


def swapped_master_weights(owned_params, reduced: bool) -> MasterWeights:
    """MasterWeights whose fp32 masters (under bf16/fp16, or for a model off the CPU) are CPU
    placeholders from the start: their values go to the swap file one tensor at a time
    (NvmeOptimizerUpdate), never all in RAM."""
    masters = MasterWeights(owned_params, keep_fp32_copy=False)
    if reduced or any(stages_through_host(param.device) for _, param in owned_params):
        masters.separate = True
        masters.masters = [
            torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(param.shape)) for param in masters.compute
        ]
    return masters


class NvmeOptimizerUpdate:
    def __init__(self, optimizer, masters, space: SwapSpace, offload):
        self.optimizer, self.masters, self.space = optimizer, masters, space
        self.names = list(masters.names)
        self.index_of = {id(master): index for index, master in enumerate(masters.masters)}
        self.keys: list[set[str]] = [set() for _ in self.names]  # state keys on the swap, per tensor
        self.swapped_masters = masters.separate
        if self.swapped_masters:
            for name, param in zip(self.names, masters.compute):
                self._put([(f"{name}/master", param.detach().to(torch.float32))])
        self.groups, current, current_bytes = [], [], 0
        for index, master in enumerate(masters.masters):
            num_bytes = 12 * master.numel()
            if current and current_bytes + num_bytes > offload.buffer_size:
                self.groups.append(current)
                current, current_bytes = [], 0
            current.append(index)
            current_bytes += num_bytes
        if current:
            self.groups.append(current)
        self.buffer_count = offload.buffer_count
        self.pipeline_read = check_pipeline(offload.buffer_count, offload.pipeline_read)
        self.pipeline_write = offload.pipeline_write
        # stage 3 with everything on NVMe: 16-bit weights and gradients rest in the parameter swap file, and
        # each sub-group's are read for its step (streamed_step.py; set by the build)
        self.streamed = None

    # ---- the update interface (see interface.py) ---------------------------------------------------
    def gradients(self, touched_ids: set[int]) -> list:
        """The compute parameters' gradients: their fp32 copies are made per sub-group in apply(),
        not for every owned tensor at once. Streamed ones are StoredGradient (a .grad without
        backward, assigned by hand, counts there, as torch's)."""
        streamed = self.streamed
        if streamed is not None:
            streamed.reconcile()
        grads = []
        for param in self.masters.compute:
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

    def _master_grad(self, grad: torch.Tensor | None, multiplier: torch.Tensor | None) -> torch.Tensor | None:
        """What the optimizer reads as a master's gradient, as OptimizerUpdate makes it: the fp32
        copy of the reduced gradient, times the multiplier."""
        if grad is None:
            return None
        if self.masters.separate:
            grad = grad.to("cpu", torch.float32)
        if multiplier is not None:
            grad.mul_(multiplier.to(grad.dtype))
        return grad

    def apply(self, multiplier: torch.Tensor | None) -> None:
        streamed = self.streamed
        compute = self.masters.compute
        in_stream = [streamed is not None and streamed.has_grad(param) for param in compute]
        # Only the stepping sub-group's tensors may carry a gradient during its step() call.
        grads = [None if streamed_grad else param.grad for param, streamed_grad in zip(compute, in_stream)]
        for param in compute:
            param.grad = None
        before = [
            {key: value for key, value in group.items() if key != "params"} for group in self.optimizer.param_groups
        ]
        writes, reads = [], {}
        try:
            for position, indices in enumerate(self.groups):
                if position:
                    for group, values in zip(self.optimizer.param_groups, before):
                        group.update(values)
                if position not in reads:
                    reads[position] = self._start_reads(indices, in_stream)
                if self.pipeline_read and position + 1 < len(self.groups):
                    reads[position + 1] = self._start_reads(self.groups[position + 1], in_stream)
                self._finish_reads(indices, reads.pop(position))
                for index in indices:
                    if in_stream[index]:  # the weights come into the compute tensor with the gradient
                        grads[index] = streamed.bring(compute[index])
                    self.masters.masters[index].grad = self._master_grad(grads[index], multiplier)
                    grads[index] = None
                self._step_only(indices)
                for index in indices:
                    self.masters.masters[index].grad = None
                    # streamed, a tensor that got no gradient rests released: torch's optimizers
                    # leave it as it was, so its stored weights stay right
                    present = streamed is None or in_stream[index] or streamed.stage3.holds(compute[index])
                    if self.swapped_masters and present:
                        with torch.no_grad():
                            compute[index].copy_(self.masters.masters[index])
                    if in_stream[index]:
                        streamed.put_back(compute[index])
                writes.append(self._start_writes(indices))
                while len(writes) > (self.buffer_count if self.pipeline_write else 0):
                    self.space.wait(writes.pop(0), "writing")
        finally:
            try:
                self.space.wait([r for requests in reads.values() for r, _ in requests], "reading")
            finally:
                if streamed is not None:
                    streamed.drop_brought()  # left only by a failed step
                self.space.wait([r for requests in writes for r in requests], "writing")
        if not self.swapped_masters:
            self.masters.write_back()
        if streamed is not None:
            streamed.discard()

    def _step_only(self, indices) -> None:
        """optimizer.step() for the resident sub-group alone: what the call does to the state of
        other tensors (FRUGAL's renewal resets every tensor's moments) is undone, since each
        tensor's own call makes the same decision for it."""
        resident = {id(self.masters.masters[index]) for index in indices}
        state = self.optimizer.state
        others = [master for master in self.masters.masters if id(master) not in resident]
        before = {master: dict(state[master]) for master in others if master in state}
        self.optimizer.step()
        for master in others:
            if master in before:
                state[master] = before[master]
            else:
                state.pop(master, None)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.streamed is not None:
            self.streamed.discard()
        for param in self.masters.compute:
            param.grad = None

    def _start_reads(self, indices, in_stream=None) -> list:
        """The reads of the sub-group's masters and state (and, streamed, the start of its
        weights' and gradients' reads from the parameter swap file)."""
        requests = []
        for index in indices:
            if in_stream is not None and in_stream[index]:
                self.streamed.start_bring(self.masters.compute[index])
            name = self.names[index]
            slots = ([f"{name}/master"] if self.swapped_masters else []) + [f"{name}/{key}" for key in self.keys[index]]
            for slot_name in slots:
                slot = self.space.swap.slot(slot_name)
                value = torch.empty(slot.shape, dtype=slot.dtype)
                requests.append(((self.space.swap.get(slot_name, value), slot_name), (index, slot_name, value)))
        return requests

    def _finish_reads(self, indices, requests) -> None:
        self.space.wait([request for request, _ in requests], "reading")
        for _, (index, slot_name, value) in requests:
            key = slot_name[len(self.names[index]) + 1 :]
            master = self.masters.masters[index]
            if key == "master":
                master.data = value
            else:
                self.optimizer.state[master][key] = value

    def _start_writes(self, indices) -> list:
        """Puts the sub-group's masters and state, drops them from RAM (each put holds its tensor
        until written), and removes the slots of state the step dropped."""
        puts = []
        for index in indices:
            name, master = self.names[index], self.masters.masters[index]
            if self.swapped_masters:
                puts.append((f"{name}/master", master.data))
                master.data = _placeholder(master.data)
            state = self.optimizer.state.get(master, {})
            keys = {key for key, value in state.items() if _swappable(value)}
            for key in self.keys[index] - keys:
                self.space.swap.remove(f"{name}/{key}")
            for key in keys:
                puts.append((f"{name}/{key}", state.pop(key)))
            self.keys[index] = keys
        return self._submit(puts)

    def _submit(self, puts) -> list:
        requests = []
        for slot_name, value in puts:
            value = value.contiguous()
            if slot_name in self.space.swap:
                slot = self.space.swap.slot(slot_name)
                if (slot.dtype, slot.shape) != (value.dtype, tuple(value.shape)):
                    self.space.swap.remove(slot_name)
            requests.append((self.space.swap.put(slot_name, value), slot_name))
        return requests

    def _put(self, puts) -> None:
        self.space.wait(self._submit(puts), "writing")

    # ---- checkpoints ----------------------------------------------------------------------------
    def swapped_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        per_name = {
            name: ([f"{name}/master"] if self.swapped_masters else []) + [f"{name}/{key}" for key in keys]
            for name, keys in zip(self.names, self.keys)
        }
        views = self.space.views([slot for slots in per_name.values() for slot in slots])
        return {name: {slot[len(name) + 1 :]: views[slot] for slot in slots} for name, slots in per_name.items()}

    def restore_master(self, name: str, value: torch.Tensor) -> None:
        index = self.names.index(name)
        master = self.masters.masters[index]
        if not self.swapped_masters:
            with torch.no_grad():
                master.copy_(value)
            return
        self._put([(f"{name}/master", value.detach().to(torch.float32).reshape(master.shape))])

    def restore_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        index = self.names.index(name)
        for key in self.keys[index] - set(tensors):
            self.space.swap.remove(f"{name}/{key}")
        self._put([(f"{name}/{key}", value) for key, value in tensors.items()])
        self.keys[index] = set(tensors)

    def adopt(self, optimizer) -> None:
        """Moves any tensor state a load put in RAM into the swap file."""
        for master, state in optimizer.state.items():
            index = self.index_of.get(id(master))
            if index is None:
                continue
            keys = {key for key, value in state.items() if _swappable(value)}
            if keys:
                self._put([(f"{self.names[index]}/{key}", state.pop(key)) for key in keys])
                self.keys[index] |= keys

    # ---- accounting -----------------------------------------------------------------------------
    @property
    def master_bytes(self) -> int:
        return self.masters.num_bytes

    @property
    def state_bytes(self) -> int:
        table = self.space.swap.table()
        swapped = sum(table[f"{name}/{key}"][1] for name, keys in zip(self.names, self.keys) for key in keys)
        in_ram = sum(  # scalar step counters (torch's Adam keeps a tensor)
            value.numel() * value.element_size()
            for state in self.optimizer.state.values()
            for value in state.values()
            if torch.is_tensor(value)
        )
        return swapped + in_ram

    @property
    def bytes_in_use(self) -> int:
        return 0  # between steps nothing is resident

    @property
    def swap_bytes(self) -> int:
        """What the rank's swap file takes on disk (preallocated at start)."""
        return self.space.capacity_bytes

    @property
    def swap_transferred_bytes(self) -> tuple[int, int]:
        """(bytes read, bytes written) through the rank's swap file so far."""
        return self.space.transferred_bytes
