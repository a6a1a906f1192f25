"""The host tier of optimizer-state offload (zero_optimization.offload_optimizer.device "cpu"):
each rank's owned fp32 masters and optimizer state live in host memory carved from HostArenas
(one mmap each, exact 4 KiB-aligned blocks, registered with CUDA when a GPU is present).

How tensors get there:
- CPUAdamW (what Adam and AdamW become under offload) allocates its state through
  `allocate_state`, which the tier points at itself.
- Any other optimizer (GaLoreAdamW, FRUGAL, SGD) creates its state with torch on the host, and
  the tier adopts it after each step: it copies every state tensor not yet in an arena into one,
  and frees the blocks of tensors the optimizer dropped (FRUGAL renews its state on refresh).
  Scalar step counters stay where they are.
The first arena is sized by the plan (memfit estimate); a tier that needs more grows by another
arena rather than failing.
"""

import logging
import os

import torch

from memfit.config import ConfigError
from memfit.io import HostArena
from memfit.io.extents import align_up
from memfit.optim.cpu_adam import CPUAdamW
from memfit.optim.registry import find_optimizer

logger = logging.getLogger("memfit")

GROWTH_BYTES = 64 << 20


class HostTier:
    def __init__(self, planned_bytes: int, *, pin: bool):
        self._pin = pin
        self._arenas: list[HostArena] = []
        self._adopted: dict[int, torch.Tensor] = {}  # data_ptr -> tensor this tier allocated
        self._held: set[int] = set()  # data_ptrs of tier tensors in use outside optimizer state
        self._add_arena(max(planned_bytes, 4096))

    def _add_arena(self, capacity_bytes: int) -> HostArena:
        arena = HostArena(capacity_bytes, register_cuda=self._pin and torch.cuda.is_available())
        self._arenas.append(arena)
        if len(self._arenas) > 1:
            logger.debug("host tier: added an arena of %d bytes", arena.capacity_bytes)
        return arena

    def zeros(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        tensor = self.empty(shape, dtype)
        tensor.zero_()
        return tensor

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        num_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if num_bytes == 0:
            return torch.empty(shape, dtype=dtype)
        for arena in self._arenas:
            if arena.capacity_bytes - arena.bytes_in_use >= num_bytes:
                try:
                    tensor = arena.alloc(shape, dtype)
                    break
                except MemoryError:  # free bytes, but fragmented
                    continue
        else:
            tensor = self._add_arena(max(align_up(num_bytes), GROWTH_BYTES)).alloc(shape, dtype)
        self._adopted[tensor.data_ptr()] = tensor
        return tensor

    def owns(self, tensor: torch.Tensor) -> bool:
        return tensor.data_ptr() in self._adopted

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Moves the optimizer's state tensors into the arenas, and frees blocks it let go of."""
        referenced = set()
        for state in optimizer.state.values():
            for key, value in state.items():
                if not torch.is_tensor(value) or value.device.type != "cpu" or value.dim() == 0:
                    continue  # a scalar step counter stays where it is
                if not self.owns(value):
                    moved = self.empty(tuple(value.shape), value.dtype)
                    moved.copy_(value)
                    state[key] = value = moved
                referenced.add(value.data_ptr())
        self._free_unreferenced(referenced | self._held)

    def hold(self, tensor: torch.Tensor) -> None:
        """Marks a tier tensor as in use outside the optimizer state (a master weight)."""
        self._held.add(tensor.data_ptr())

    def _free_unreferenced(self, referenced: set) -> None:
        for pointer in [p for p in self._adopted if p not in referenced]:
            tensor = self._adopted.pop(pointer)
            for arena in self._arenas:
                if arena.owns(tensor):
                    arena.free(tensor)
                    break

    @property
    def bytes_in_use(self) -> int:
        return sum(arena.bytes_in_use for arena in self._arenas)

    @property
    def capacity_bytes(self) -> int:
        return sum(arena.capacity_bytes for arena in self._arenas)

    @property
    def pinned(self) -> bool:
        return all(arena.pinned for arena in self._arenas)


KERNEL_OPTIMIZERS = ("Adam", "AdamW", "CPUAdamW")


def stages_through_host(device: torch.device) -> bool:
    """Whether the host tier keeps fp32 masters apart from the compute parameters, which then
    cross to the host as gradients and back as parameters: where the model runs off the CPU. On
    the CPU the kernel updates the compute parameters in place. MEMFIT_OFFLOAD_STAGED=1 forces the
    staged path on the CPU (it is what a GPU runs; the tests compare the two)."""
    return device.type != "cpu" or os.environ.get("MEMFIT_OFFLOAD_STAGED") == "1"


def runs_on_kernel(name: str) -> bool:
    """Whether the config's optimizer becomes CPUAdamW on the host tier."""
    return find_optimizer(name) in KERNEL_OPTIMIZERS


def kernel_optimizer(name: str, config_params: dict, params: list[torch.Tensor], cls=CPUAdamW) -> CPUAdamW | None:
    """The CPUAdamW that a config's Adam, AdamW or CPUAdamW becomes on the host tier (same
    hyperparameters, DeepSpeed's adam_w_mode and bias_correction honoured); None for other
    optimizers, which run with torch ops on host tensors. cls: CPUAdamW or a subclass (the NVMe
    tier's StreamedAdamW)."""
    if not runs_on_kernel(name):
        return None
    registered = find_optimizer(name)
    options = dict(config_params)
    if options.pop("amsgrad", False):
        raise ConfigError([f"optimizer.params.amsgrad: not supported with offload_optimizer (the {name} kernel)"])
    if registered == "Adam":
        options["adamw_mode"] = options.pop("adam_w_mode", True)
        options.setdefault("weight_decay", 0.0)
    elif registered == "AdamW":
        options.setdefault("weight_decay", 0.01)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return cls(params, **options)


def planned_host_bytes(owned: list[torch.Tensor], *, kernel: bool, reduced_precision: bool) -> int:
    """Bytes the host tier needs for the tensors a rank owns, each block rounded to 4 KiB: the
    kernel's exp_avg and exp_avg_sq, plus an fp32 master per 16-bit tensor. Other optimizers'
    state is not known ahead; the tier grows for it."""
    per_element = (8 if kernel else 0) + (4 if reduced_precision else 0)
    blocks_per_tensor = (2 if kernel else 0) + (1 if reduced_precision else 0)
    total = 0
    for tensor in owned:
        per_block = tensor.numel() * per_element // max(blocks_per_tensor, 1)
        total += blocks_per_tensor * align_up(per_block) if per_block else 0
    return total
