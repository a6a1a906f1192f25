"""offload_param "nvme": the 16-bit values of the tensors a rank owns rest in a swap file of its
own under offload_param.nvme_path (the swap files of memfit's I/O engine: preallocated, O_DIRECT,
locked while in use, removed at exit, never read back by a later run).

A tensor's slot is written when the engine releases it after a change (at the start, after each
optimizer step, after a change kept from GatheredParameters) and read when it is gathered. With
with_grads (the streamed step, streamed_step.py) each tensor also has a gradient slot.

offload_param.max_in_cpu, as in DeepSpeed: the values of the first tensors, up to that many
elements in all, rest in host memory instead, as a copy of their own that reads and writes copy
from and to (so a tensor gathered and changed without being kept does not change it); with_grads,
so do their gradients (DeepSpeed keeps every gradient in host memory under offload_optimizer). A
read of a kept gradient gives the copy itself: the step only reads it. memfit's default is 0
(DeepSpeed's is 1e9, which keeps every tensor of a model under a billion parameters in memory
under "nvme")."""

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
    """The swap file's bytes: for each tensor not kept in memory a value slot, and with_grads a
    gradient slot; element_size: of every tensor (None: each tensor's own)."""
    per_tensor = 2 if with_grads else 1
    return per_tensor * sum(
        slot_bytes(t.numel(), element_size or t.element_size()) for name, t in named if name not in kept
    )


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
        # id -> the values (and gradient) of a tensor kept in memory, once written
        self.kept = {id(param): None for name, param in named if name in kept}
        self.kept_grads = {id(param): None for name, param in named if name in kept} if with_grads else {}
        capacity = store_slot_bytes(named, kept, with_grads)
        self.swap = open_swap(directory, rank, max(capacity, 1), block_size=aio.block_size, queue_depth=aio.queue_depth)

    @property
    def kept_bytes(self) -> int:
        """Bytes of values resting in host memory (offload_param.max_in_cpu)."""
        return _bytes(self.kept)

    @property
    def kept_grad_bytes(self) -> int:
        """Bytes of gradient buffers in host memory (max_in_cpu, with_grads)."""
        return _bytes(self.kept_grads)

    def write(self, param, values: torch.Tensor) -> None:
        if id(param) in self.kept:
            _copy_into(self.kept, id(param), values)
            return
        self.swap.put(self.name_of[id(param)], values.detach().contiguous()).wait()

    def start_write(self, param, values: torch.Tensor):
        """The write of the tensor's values, in flight: the caller keeps `values` until it is done."""
        if id(param) in self.kept:
            _copy_into(self.kept, id(param), values)
            return _Finished()
        return self.swap.put(self.name_of[id(param)], values.detach().contiguous())

    def read(self, param, shape: torch.Size) -> torch.Tensor:
        buffer, request = self.start_read(param, shape)
        request.wait()
        return buffer

    def start_read(self, param, shape: torch.Size, grad: bool = False) -> tuple[torch.Tensor, object]:
        """(buffer, request): the read of the tensor's values (or its gradient) into a new buffer,
        in flight. A read or write of a slot starts after the slot's earlier requests finish."""
        key = id(param)
        if key in self.kept:
            values = (self.kept_grads if grad else self.kept)[key]
            if values is None:
                raise KeyError(f"{self.name_of[key]}: {'gradient' if grad else 'values'} read before stored")
            return (values if grad else values.clone()), _Finished()
        buffer = torch.empty(shape, dtype=param.dtype, device=param.device)
        return buffer, self.swap.get(self.name_of[key] + ("/grad" if grad else ""), buffer)

    def start_write_grad(self, param, grad: torch.Tensor):
        """The write of a gradient, in flight: the caller keeps `grad` until it is done."""
        if id(param) in self.kept_grads:
            _copy_into(self.kept_grads, id(param), grad)
            return _Finished()
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
        self.kept, self.kept_grads = dict.fromkeys(self.kept), dict.fromkeys(self.kept_grads)


def _copy_into(buffers: dict, key: int, values: torch.Tensor) -> None:
    """Copies values into buffers[key], made on first use (nothing to copy when it is the buffer)."""
    if buffers[key] is None:
        buffers[key] = torch.empty(values.shape, dtype=values.dtype, device=values.device)
    if values is not buffers[key]:
        buffers[key].copy_(values.detach())


def _bytes(buffers: dict) -> int:
    return sum(t.numel() * t.element_size() for t in buffers.values() if t is not None)
