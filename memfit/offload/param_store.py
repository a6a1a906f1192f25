"""offload_param "nvme": the 16-bit values of the tensors a rank owns rest in a swap file of its
own under offload_param.nvme_path (the swap files of memfit's I/O engine: preallocated, O_DIRECT,
locked while in use, removed at exit, never read back by a later run).

A tensor's slot is written when the engine releases it after a change (at the start, after each
optimizer step, after a change kept from GatheredParameters) and read when it is gathered. With
with_grads (the streamed step, streamed_step.py) each tensor also has a gradient slot."""

import torch

from memfit.offload.swap_space import open_swap, slot_bytes


class NvmeParamStore:
    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], directory: str, rank: int, aio, with_grads=False):
        self.name_of = {id(param): name for name, param in named}
        capacity = sum(slot_bytes(p.numel(), p.element_size()) for _, p in named) * (2 if with_grads else 1)
        self.swap = open_swap(directory, rank, max(capacity, 1), block_size=aio.block_size, queue_depth=aio.queue_depth)

    def write(self, param, values: torch.Tensor) -> None:
        self.swap.put(self.name_of[id(param)], values.detach().contiguous()).wait()

    def read(self, param, shape: torch.Size) -> torch.Tensor:
        buffer, request = self.start_read(param, shape)
        request.wait()
        return buffer

    def start_read(self, param, shape: torch.Size, grad: bool = False) -> tuple[torch.Tensor, object]:
        """(buffer, request): the read of the tensor's values (or its gradient) into a new buffer,
        in flight. A read or write of a slot starts after the slot's earlier requests finish."""
        buffer = torch.empty(shape, dtype=param.dtype, device=param.device)
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
