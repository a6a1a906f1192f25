"""memfit.activation_offload "nvme": the inputs checkpointed blocks keep for backward rest in a
swap file of the rank's own (memfit's I/O engine, as the other NVMe tiers), Fuyou's activation
swapping for long sequences.

A block's input is written as its forward runs (the write proceeds while the next blocks compute)
and its memory is the forward's to free. Backward takes the inputs in reverse order: taking one
waits for its read and starts the read of the one saved before it, so the next block's input is
on its way while this block runs again. A slot is freed once taken, or when autograd drops the
graph without a backward (the handle's finalizer)."""

import itertools
import weakref

import torch

from memfit.offload.swap_space import open_swap


class Kept:
    """One saved tensor: its slot, and its read once started."""

    __slots__ = ("name", "shape", "dtype", "device", "written", "source", "read", "value", "__weakref__")

    def __init__(self, name, tensor, values, written):
        self.name, self.shape, self.dtype, self.device = name, tensor.shape, tensor.dtype, tensor.device
        self.written, self.source = written, values  # the values written stay referenced until written
        self.read = self.value = None


class ActivationSwap:
    def __init__(self, directory: str, rank: int, capacity_bytes: int, aio):
        self.swap = open_swap(directory, rank, capacity_bytes, block_size=aio.block_size, queue_depth=aio.queue_depth)
        self._names = itertools.count()
        self._kept: list[weakref.ref] = []  # in the order saved; backward takes from the end

    def put(self, tensor: torch.Tensor) -> Kept:
        self.release_written()
        values = tensor.detach()
        if values.device.type != "cpu":
            values = values.to("cpu")
        values = values.contiguous()
        name = f"activation-{next(self._names)}"
        try:
            written = self.swap.put(name, values)
        except OSError as error:
            raise OSError(
                error.errno,
                f"memfit.activation_offload: the block inputs of one forward do not fit the activation swap file "
                f"({error.strerror}); raise memfit.activation_offload.swap_bytes",
                self.swap.path,
            ) from None
        kept = Kept(name, tensor, values, written)
        weakref.finalize(kept, self._free, name)
        self._kept.append(weakref.ref(kept))
        return kept

    def take(self, kept: Kept) -> torch.Tensor:
        """The tensor kept, read back (its read was started ahead, or starts now); the read of the
        tensor saved before it starts."""
        self._start_read(kept)
        kept.read.wait()
        value, kept.value, kept.read = kept.value, None, None
        self._free(kept.name)
        position = next((i for i, ref in enumerate(self._kept) if ref() is kept), None)
        if position is not None:
            del self._kept[position]
            earlier = self._kept[position - 1]() if position > 0 else None
            if earlier is not None:
                self._start_read(earlier)
        return value.to(kept.device) if kept.device.type != "cpu" else value

    def _start_read(self, kept: Kept) -> None:
        if kept.read is not None:
            return
        if kept.source is not None:
            kept.written.wait()
            kept.source = None  # written: the forward's tensor may go
        kept.value = torch.empty(kept.shape, dtype=kept.dtype)
        kept.read = self.swap.get(kept.name, kept.value)

    def release_written(self) -> None:
        """Lets go of the forward's tensors whose writes have finished (a failed write raises)."""
        for ref in self._kept:
            kept = ref()
            if kept is not None and kept.source is not None and kept.written.done():
                kept.written.wait()
                kept.source = None

    def _free(self, name: str) -> None:
        try:
            self.swap.remove(name)
        except (KeyError, ValueError):  # freed when taken, or the file is closed
            pass

    def close(self) -> None:
        self.swap.close()
