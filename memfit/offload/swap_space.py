"""The swap space of the NVMe tier of optimizer-state offload (zero_optimization.offload_optimizer
.device "nvme"): one preallocated O_DIRECT SwapFile per rank under nvme_path, the checks of that
directory at initialize, and the layout the streamed step reads and writes.

Files. Rank r of a process with pid p swaps to nvme_path/memfit-swap-rank<r>-<p>-<n>.swap (n counts
the engines of the process). A SwapFile
holds an advisory lock on its file while it lives and removes the file at a normal exit; a file
left by a killed run is unlocked, and the next run in that directory deletes it (under a lock on
nvme_path/.memfit-swap.lock, so that no rank deletes a file another rank is creating). Nothing a
previous run left is ever read back: state comes from a checkpoint or starts fresh.

Layout. Each swapped tensor (a fp32 master, exp_avg, a GaLore basis) has its own slot. The fused
step reads and writes ranges of slots (pieces, see plan_subgroups), so a tensor larger than a
ring buffer is streamed in parts; every slot is one contiguous range of the file, which is what
lets a checkpoint read a tensor straight from the file (`view`) without a copy in RAM.
"""

import errno
import fcntl
import itertools
import math
import mmap
import os
import tempfile
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch

from memfit.io import SwapFile
from memfit.io.extents import ALIGNMENT, align_up
from memfit.units import format_bytes

PATH_KEY = "zero_optimization.offload_optimizer.nvme_path"
SWAP_PREFIX = "memfit-swap-"
SWAP_SUFFIX = ".swap"
DIRECTORY_LOCK = ".memfit-swap.lock"
# Pieces of split tensors start at multiples of this many fp32 elements (4 KiB): file offsets and
# ring-buffer offsets stay aligned for O_DIRECT.
ALIGN_ELEMENTS = ALIGNMENT // 4


# ---- nvme_path ----------------------------------------------------------------------------------
def nvme_path_problem(path: str, needed_bytes: int, key: str = PATH_KEY) -> str | None:
    """Why nvme_path cannot hold needed_bytes of swap files, as one line naming the path; None if
    it can. Stale swap files of killed runs count as free: they are deleted before allocating."""
    if not os.path.exists(path):
        return f"{key}: {path} does not exist"
    if not os.path.isdir(path):
        return f"{key}: {path} is not a directory"
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".memfit-probe-", dir=path)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        return f"{key}: {path} is not writable ({error.strerror})"
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize + sum(os.path.getsize(stale) for stale in _stale_swap_files(path))
    if needed_bytes > free:
        return (
            f"{key}: {path} has {format_bytes(free)} free ({free} bytes); the swap files of the ranks on "
            f"this node need {format_bytes(needed_bytes)} ({needed_bytes} bytes)"
        )
    return None


def _swap_files(directory: str) -> list[str]:
    return [
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith(SWAP_PREFIX) and name.endswith(SWAP_SUFFIX)
    ]


def _stale_swap_files(directory: str) -> list[str]:
    """Swap files no living SwapFile holds (their advisory lock is free)."""
    stale = []
    for path in _swap_files(directory):
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            stale.append(path)
        except BlockingIOError:
            pass
        finally:
            os.close(descriptor)
    return stale


_engine_numbers = itertools.count()  # several engines in one process get a file each


@contextmanager
def _directory_locked(directory: str):
    descriptor = os.open(os.path.join(directory, DIRECTORY_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def swap_file_bytes(planned_bytes: int) -> int:
    """The size of a swap file planned to hold planned_bytes (one block at least)."""
    return max(align_up(planned_bytes), ALIGNMENT)


def open_swap(
    directory: str, rank: int, capacity_bytes: int, *, block_size: int, queue_depth: int, label: str = ""
) -> SwapFile:
    """This rank's swap file, after deleting the stale ones of killed runs; label (such as
    "birth-") tells in the file's name what it holds."""
    with _directory_locked(directory):
        for stale in _stale_swap_files(directory):
            os.unlink(stale)
        name = f"{SWAP_PREFIX}{label}rank{rank}-{os.getpid()}-{next(_engine_numbers)}{SWAP_SUFFIX}"
        path = os.path.join(directory, name)
        return SwapFile(path, swap_file_bytes(capacity_bytes), block_size=block_size, queue_depth=queue_depth)


def check_pipeline(buffer_count: int, pipeline_read: bool) -> bool:
    if pipeline_read and buffer_count < 2:
        warnings.warn(
            "zero_optimization.offload_optimizer.pipeline_read is ignored with buffer_count 1: the next "
            "sub-group has no buffer to be read into",
            UserWarning,
            stacklevel=3,
        )
        return False
    return pipeline_read


# ---- layout -------------------------------------------------------------------------------------
class Piece(NamedTuple):
    """Elements [start, stop) of tensor `index`; in its ring buffer, kind k of the piece sits at
    buffer_offset + k * width (elements)."""

    index: int
    start: int
    stop: int
    buffer_offset: int
    width: int


def plan_subgroups(numels: list[int], kinds: list[int], buffer_elements: int) -> list[list[Piece]]:
    """Splits tensors (numels[i] elements, kinds[i] fp32 state tensors each) into sub-groups whose
    state fits one ring buffer of buffer_elements, in order; a tensor that does not fit in what is
    left of a buffer is split at a multiple of ALIGN_ELEMENTS."""
    assert buffer_elements >= 3 * ALIGN_ELEMENTS
    groups, current, used = [], [], 0
    for index, (numel, num_kinds) in enumerate(zip(numels, kinds)):
        start = 0
        while start < numel:
            room = (buffer_elements - used) // num_kinds // ALIGN_ELEMENTS * ALIGN_ELEMENTS
            if room == 0:
                groups.append(current)
                current, used = [], 0
                continue
            count = min(numel - start, room)
            width = align_up(count * 4) // 4
            current.append(Piece(index, start, start + count, used, width))
            used += num_kinds * width
            start += count
    if current:
        groups.append(current)
    return groups


def slot_bytes(numel: int, element_size: int = 4) -> int:
    return align_up(numel * element_size)


class SwapSpace:
    """A rank's SwapFile plus what the streamed step needs around it: ranged reads and writes of
    slots with errors that name the tensor, and zero-copy views for checkpoints."""

    def __init__(self, swap: SwapFile):
        self.swap = swap
        self.path = swap.path

    def read(self, slot_name: str, into: torch.Tensor, element_offset: int = 0):
        offset = self.swap.slot(slot_name).offset + element_offset * into.element_size()
        return self.swap.file.pread(into, offset)

    def write(self, slot_name: str, tensor: torch.Tensor, element_offset: int = 0):
        offset = self.swap.slot(slot_name).offset + element_offset * tensor.element_size()
        return self.swap.file.pwrite(tensor, offset)

    def wait(self, requests, what: str) -> None:
        """Waits for every request; the first failure raises OSError naming the swap file and what
        was transferred, after the others have finished (no transfer outlives the step)."""
        failure = None
        for request, name in requests:
            try:
                request.wait()
            except OSError as error:
                if failure is None:
                    failure = OSError(
                        error.errno,
                        f"{what} {name}: {error.strerror or os.strerror(error.errno or errno.EIO)}",
                        self.path,
                    )
        if failure is not None:
            raise failure

    def views(self, slot_names: list[str]) -> dict[str, torch.Tensor]:
        """Read-only-by-contract tensors over the slots' bytes in the file (memory-mapped: pages
        come from the file as they are read, and the kernel may drop them again)."""
        if not slot_names:
            return {}
        self.swap.file.fsync()  # every write has landed, and a failed one raises here
        descriptor = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mapping = mmap.mmap(descriptor, self.swap.capacity_bytes, access=mmap.ACCESS_COPY)
        finally:
            os.close(descriptor)
        views = {}
        for name in slot_names:
            slot = self.swap.slot(name)
            count = math.prod(slot.shape)
            flat = torch.frombuffer(mapping, dtype=slot.dtype, count=count, offset=slot.offset) if count else None
            views[name] = flat.view(slot.shape) if flat is not None else torch.empty(slot.shape, dtype=slot.dtype)
        return views

    @property
    def capacity_bytes(self) -> int:
        return self.swap.capacity_bytes

    @property
    def transferred_bytes(self) -> tuple[int, int]:
        """(bytes read, bytes written) through the swap file since it was opened."""
        return self.swap.file.bytes_read, self.swap.file.bytes_written

    def close(self) -> None:
        self.swap.close()
