"""memfit.zero_init: builds a model whose parameters never all sit in memory, for ZeRO stage 3
with offload_param "nvme" (DeepSpeed's zero.Init).

Inside the context every parameter registered on a module goes, as it is registered, to a birth
file under offload_param.nvme_path (swap files of memfit's I/O engine: preallocated, O_DIRECT,
removed at exit; more are opened, each twice the last, as the model grows), and the parameter
keeps a placeholder of its shape, dtype and device that holds nothing (one NaN seen in the full
shape, as stage 3's released tensors). The torch calls made inside the context that use a
parameter's values read it back for the call (values_on_use.py): initialization code, a module's
own reset_parameters, a parent's `self.apply(init)` after its children were built, all give the
values an eager build gives, bit for bit. A parameter registered twice (tied weights) is stored
once.

memfit.initialize then fills each rank's parameter store from the birth file tensor by tensor
(rank 0's values, cast to the compute dtype as the eager build's cast does; see fill_store), and
the birth file is deleted. With another config, initialize reads each parameter back into memory
(materialize) and goes on as with an eager build. Outside any zero_init context a placeholder is
not the parameter's values: reading it gives NaN, writing into it fails.
"""

import contextlib
import itertools
import logging
import os
import weakref

import torch
import torch.distributed as dist

from memfit.config import ClientComponents, ConfigError
from memfit.io.swap import SwapFullError
from memfit.offload.swap_space import nvme_path_problem, open_swap, slot_bytes
from memfit.runtime.memory_stats import return_freed_pages
from memfit.runtime.zero.values_on_use import ValuesOnUse

logger = logging.getLogger("memfit")
PATH_KEY = "zero_optimization.offload_param.nvme_path"
FIRST_FILE_BYTES = 64 << 20


class BirthFile:
    """Values of parameters built under zero_init, one slot each, in swap files under directory.
    A put that fits no open file opens one twice the size of the last (or the tensor's size); a
    file whose slots are all removed is closed and deleted."""

    def __init__(self, directory: str, rank: int, aio):
        self.directory, self.rank, self.aio = directory, rank, aio
        self.files = []
        self.file_of = {}  # slot name -> the swap file holding it
        self._next_bytes = FIRST_FILE_BYTES
        self._names = itertools.count()

    def put(self, values: torch.Tensor) -> str:
        """Writes values (contiguous, on the CPU) to a new slot; returns its name."""
        name = str(next(self._names))
        needed = slot_bytes(values.numel(), values.element_size())
        for swap in self.files:
            if swap.free_bytes >= needed:
                try:
                    swap.put(name, values).wait()
                except SwapFullError:  # free, but not in one piece
                    continue
                self.file_of[name] = swap
                return name
        swap = open_swap(
            self.directory,
            self.rank,
            max(needed, self._next_bytes),
            block_size=self.aio.block_size,
            queue_depth=self.aio.queue_depth,
            label="birth-",
        )
        self._next_bytes = 2 * swap.capacity_bytes
        self.files.append(swap)
        swap.put(name, values).wait()
        self.file_of[name] = swap
        return name

    def get(self, name: str, into: torch.Tensor) -> None:
        self.file_of[name].get(name, into).wait()

    def remove(self, name: str) -> None:
        swap = self.file_of.pop(name, None)
        if swap is None:
            return
        swap.remove(name)
        if not swap.names():
            self.files.remove(swap)
            swap.close()


def _nan_placeholder(shape, dtype, device) -> torch.Tensor:
    return torch.full((1,), float("nan"), dtype=dtype, device=device).expand(shape)


class Born:
    """Where a parameter built under zero_init rests: its slot in the birth file, and the device
    and dtype its values take when read (initialize's cast changes those, not the file)."""

    def __init__(self, birth: BirthFile, param: torch.nn.Parameter):
        self.birth, self.param_ref = birth, weakref.ref(param)
        self.name, self._forget = None, None
        self.write(param.data)

    def read(self) -> torch.Tensor:
        slot = self.birth.file_of[self.name].slot(self.name)
        buffer = torch.empty(self.shape, dtype=slot.dtype)
        self.birth.get(self.name, buffer)
        values = buffer.to(self.device)  # as Module.to(device), then Module.to(dtype)
        return values if values.dtype == self.dtype else values.to(self.dtype)

    def write(self, values: torch.Tensor) -> None:
        device = values.device
        values = values.detach().to("cpu").contiguous()
        slot = self.birth.file_of[self.name].slot(self.name) if self.name is not None else None
        if slot is not None and (slot.dtype, slot.shape) == (values.dtype, tuple(values.shape)):
            self.birth.file_of[self.name].put(self.name, values).wait()
        else:  # a first write, or the values changed dtype or shape (Module.half() in the context)
            if self._forget is not None:
                self._forget()
            self.name = self.birth.put(values)
            self._forget = weakref.finalize(self.param_ref(), self.birth.remove, self.name)  # frees a dropped one
            self._forget.atexit = False
        self.shape, self.device, self.dtype = values.shape, device, values.dtype

    def release(self) -> None:
        param = self.param_ref()
        param.data = _nan_placeholder(self.shape, self.dtype, self.device)

    def cast(self, device, dtype) -> None:
        """Records Module.to(device) and then Module.to(dtype) (floating tensors only)."""
        self.device = torch.device(device)
        if dtype is not None and self.dtype.is_floating_point:
            self.dtype = dtype
        self.release()

    def forget(self) -> None:
        """Frees the slot; the parameter is no longer resting in the birth file."""
        self._forget()
        del self.param_ref().memfit_born


def born_of(tensor) -> Born | None:
    return getattr(tensor, "memfit_born", None) if isinstance(tensor, torch.nn.Parameter) else None


def stash(birth: BirthFile, param: torch.nn.Parameter) -> None:
    with torch._C.DisableTorchFunction():
        born = Born(birth, param)
        born.release()
        param.memfit_born = born
        return_freed_pages(param.numel() * param.element_size())


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def resolve_for_init(config):
    """The config (a path, a dict or a MemfitConfig; None: the file MEMFIT_CONFIG names), checked
    as far as it can be before the world size is known."""
    from memfit.config import resolve_config

    if config is None:
        if "MEMFIT_CONFIG" not in os.environ:
            raise ValueError("config: none given and MEMFIT_CONFIG is not set (use memfit run --config FILE)")
        config = os.environ["MEMFIT_CONFIG"]
    return resolve_config(config, None, ClientComponents(None, None)).config


def defers(cfg) -> bool:
    zero = cfg.zero_optimization
    return zero.stage == 3 and zero.offload_param.device == "nvme"


def open_birth(config, what: str) -> BirthFile | None:
    """The birth file for a build under config, or None (logged once, with the reason) when the
    config keeps parameters in memory."""
    cfg = resolve_for_init(config)
    if not defers(cfg):
        zero = cfg.zero_optimization
        logger.info(
            "%s: nothing is deferred (zero_optimization.stage %d, offload_param.device %r; it needs stage 3 with "
            'offload_param.device "nvme"): the model is built in memory',
            what,
            zero.stage,
            zero.offload_param.device,
        )
        return None
    directory = cfg.zero_optimization.offload_param.nvme_path
    if (problem := nvme_path_problem(directory, 0, PATH_KEY)) is not None:
        raise ConfigError([problem], what)
    return BirthFile(directory, _rank(), cfg.aio)


@contextlib.contextmanager
def zero_init(config=None):
    """Within the context, modules built keep their parameters' values in a birth file on NVMe
    (ZeRO stage 3 with offload_param "nvme"); with any other config it builds normally."""
    birth = open_birth(config, "memfit.zero_init")
    if birth is None:
        yield
        return
    original = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and born_of(param) is None:
            stash(birth, param)

    torch.nn.Module.register_parameter = register_parameter
    try:
        with ValuesOnUse(born_of):
            yield
    finally:
        torch.nn.Module.register_parameter = original


def defer_module(module, config=None) -> None:
    """The parameters of a module built already go to a birth file, as if it had been built under
    zero_init (deepspeed.zero.Init(module=...)); with another config nothing moves."""
    birth = open_birth(config, "deepspeed.zero.Init")
    if birth is not None:
        for param in module.parameters():
            if born_of(param) is None:
                stash(birth, param)


# ---- at memfit.initialize -----------------------------------------------------------------------
def born_parameters(model) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if born_of(param) is not None]


def birth_file_bytes(model) -> dict[str, int]:
    """{directory: bytes} of the birth files holding the model's parameters (deleted by
    fill_store, before initialize allocates the optimizer's swap file)."""
    births = {id(born.birth): born.birth for born in map(born_of, model.parameters()) if born is not None}
    found = {}
    for birth in births.values():
        found[birth.directory] = found.get(birth.directory, 0) + sum(f.capacity_bytes for f in birth.files)
    return found


def materialize(model) -> int:
    """Reads each parameter built under zero_init back into memory, one at a time (initialize with
    a config that keeps parameters in memory); returns how many."""
    born = born_parameters(model)
    with torch._C.DisableTorchFunction():
        for param in born:
            param.data = born_of(param).read()
            born_of(param).forget()
    return len(born)


@contextlib.contextmanager
def set_aside(model):
    """Hides the born parameters from the modules (their entries read None, which Module.to and
    parameters() skip) for the eager cast and broadcast of the rest; yields them."""
    hidden = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if born_of(param) is not None:
                hidden.append((module, name, param))
    for module, name, _ in hidden:
        module._parameters[name] = None
    try:
        yield list({id(p): p for _, _, p in hidden}.values())
    finally:
        for module, name, param in hidden:
            module._parameters[name] = param


def fill_store(model, stage3, rank: int, world_size: int) -> None:
    """Moves every born parameter out of the birth file, one at a time, in the same order on every
    rank: rank 0 reads its values (cast as prepare_model casts) and broadcasts them, as the eager
    build broadcasts rank 0's weights; the owner of a tensor stage 3 manages writes it to its
    store and every rank releases it; any other tensor (small, or frozen) stays in memory on
    every rank."""
    with torch._C.DisableTorchFunction():
        for param in model.parameters():
            born = born_of(param)
            if born is None:
                continue
            values = born.read() if rank == 0 else torch.empty(born.shape, dtype=born.dtype, device=born.device)
            if world_size > 1:
                dist.broadcast(values, src=0)
            born.forget()
            if id(param) in stage3.shape_of:
                if stage3.owner_of[id(param)] == rank:
                    stage3.store.write(param, values)
                del values
                stage3._release(param)
                return_freed_pages(param.numel() * param.element_size())
            else:
                param.data = values


class _Stored:
    """Where an owned, released stage-3 tensor rests: the rank's parameter store."""

    def __init__(self, stage3, param):
        self.stage3, self.param = stage3, param

    def read(self) -> torch.Tensor:
        return self.stage3.store.read(self.param, self.stage3.shape_of[id(self.param)])

    def write(self, values) -> None:
        self.stage3.store.write(self.param, values)

    def release(self) -> None:
        self.param.data = self.stage3.released_value(self.param)


def stored_on_use(stage3) -> ValuesOnUse:
    """A mode in which the rest of the build (optimizer masters, a snapshot's restore) reads each
    owned tensor from the store for the call that uses it."""
    owned = {id(p) for p in stage3.owned_managed}

    def lookup(tensor):
        key = id(tensor)
        return _Stored(stage3, tensor) if key in owned and key in stage3.absent else None

    return ValuesOnUse(lookup)
