"""offload_param "nvme": the 16-bit values of the tensors a rank owns rest in a swap file of its
own under offload_param.nvme_path (the swap files of memfit's I/O engine: preallocated, O_DIRECT,
locked while in use, removed at exit, never read back by a later run).

A tensor's slot is written when the engine releases it after a change (at the start, after each
optimizer step, after a change kept from GatheredParameters) and read when it is gathered. With
with_grads (the streamed step, streamed_step.py) each tensor also has a gradient slot.

offload_param.max_in_cpu, as in DeepSpeed: the values of the first tensors, up to that many
elements in all, rest in host memory instead, as a copy of their own that reads and writes copy
from and to (so a tensor gathered and changed without being kept does not change it). Their
gradients still go to the swap file. memfit's default is 0 (DeepSpeed's is 1e9, which keeps every
tensor of a model under a billion parameters in memory under "nvme")."""

import torch

from memfit.offload.swap_space import open_swap, slot_bytes


def kept_in_memory(named: list[tuple[str, torch.Tensor]], max_in_cpu: int) -> set[str]:
    """The names of the tensors whose values rest in host memory: the first ones, in order, while
    their elements add up to at most max_in_cpu."""
    kept, total = set(), 0
    for name, tensor in named:
        total += tensor.numel()
        if total > max_in_cpu:
            break
        kept.add(name)
    return kept


def store_slot_bytes(named: list[tuple[str, torch.Tensor]], kept: set[str], with_grads: bool, element_size=None) -> int:
    """The swap file's bytes: a value slot for each tensor not kept in memory, and a gradient slot
    for each tensor with_grads; element_size: of every tensor (None: each tensor's own)."""
    slots = [(t, name not in kept) for name, t in named] + ([(t, True) for _, t in named] if with_grads else [])
    return sum(slot_bytes(t.numel(), element_size or t.element_size()) for t, stored in slots if stored)


class _Finished:
    """The request of a read from host memory: done when made."""

    def done(self) -> bool:
        return True

    def wait(self) -> int:
        return 0


class NvmeParamStore:
    def __init__(self, named, directory: str, rank: int, aio, *, with_grads: bool = False, max_in_cpu: int = 0):
        """named: [(name, tensor)] the rank owns; with_grads: a gradient slot per tensor, for the
        streamed step; max_in_cpu: see the module's docstring."""
        self.name_of = {id(param): name for name, param in named}
        kept = kept_in_memory(named, max_in_cpu)
        self.kept = {id(param): None for name, param in named if name in kept}  # id -> its values, once written
        capacity = store_slot_bytes(named, kept, with_grads)
        self.swap = open_swap(directory, rank, max(capacity, 1), block_size=aio.block_size, queue_depth=aio.queue_depth)

    @property
    def kept_bytes(self) -> int:
        """Bytes of values resting in host memory (offload_param.max_in_cpu)."""
        return sum(values.numel() * values.element_size() for values in self.kept.values() if values is not None)

    def write(self, param, values: torch.Tensor) -> None:
        key = id(param)
        if key in self.kept:
            if self.kept[key] is None:
                self.kept[key] = torch.empty(values.shape, dtype=values.dtype, device=values.device)
            self.kept[key].copy_(values.detach())
            return
        self.swap.put(self.name_of[key], values.detach().contiguous()).wait()

    def read(self, param, shape: torch.Size) -> torch.Tensor:
        buffer, request = self.start_read(param, shape)
        request.wait()
        return buffer

    def start_read(self, param, shape: torch.Size, grad: bool = False) -> tuple[torch.Tensor, object]:
        """(buffer, request): the read of the tensor's values (or its gradient) into a new buffer,
        in flight. A read or write of a slot starts after the slot's earlier requests finish."""
        buffer = torch.empty(shape, dtype=param.dtype, device=param.device)
        if not grad and id(param) in self.kept:
            values = self.kept[id(param)]
            if values is None:
                raise KeyError(f"{self.name_of[id(param)]}: read before its values were stored")
            return buffer.copy_(values), _Finished()
        return buffer, self.swap.get(self.name_of[id(param)] + ("/grad" if grad else ""), buffer)

    def start_write_grad(self, param, grad: torch.Tensor):
        """The write of a gradient, in flight: the caller keeps `grad` until it is done."""
        return self.swap.put(self.name_of[id(param)] + "/grad", grad.detach().contiguous())

    def read_grad(self, param, shape: torch.Size) -> torch.Tensor:
        buffer, request = self.start_read(param, shape, grad=True)
        request.wait()
        return buffer

    @property
    def transferred_bytes(self) -> tuple[int, int]:
        """(bytes read, bytes written) through the swap file since it was opened."""
        return self.swap.file.bytes_read, self.swap.file.bytes_written

    @property
    def capacity_bytes(self) -> int:
        return self.swap.capacity_bytes

    def close(self) -> None:
        self.swap.close()
        self.kept = dict.fromkeys(self.kept)
