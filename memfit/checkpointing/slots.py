"""Snapshot slots: one rank's payload as flat bytes in a shared-memory file, written in place by
the worker and read zero-copy by a restarted worker, the agent and `memfit snapshot verify`.

Layout of a slot file (little-endian):
    0     magic "MFSLOT01"
    8     sequence (u64): 0 while the slot is being written; set last, after everything else, to a
          number larger than any earlier one of this rank, so the newer of two slots is known
    16    step (i64)
    24    index offset (u64), 32 index length (u64), 40 index digest (u64, XXH3 of the index)
    4096  tensor bytes, each tensor at a 64-byte aligned offset
    then  the index: a pickle of plain Python values only (no tensor, no class):
          {"step", "world_size", "rank", "owner_of", "meta", "tensors": [(path, dtype, shape,
          offset, nbytes, digest)]}; "meta" is the payload with each tensor replaced by
          {TENSOR_MARK: path}
A torn slot (a writer killed mid-copy) has sequence 0, or a digest that does not match: it is
never taken. The checksums are XXH3-64 of each tensor's bytes, as integrity.py computes them.
"""

import io
import mmap
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from memfit.checkpointing.integrity import CheckpointError, walk_tensors
from memfit.checkpointing.private_dir import open_existing

MAGIC = b"MFSLOT01"
HEADER = struct.Struct("<8sQqQQQ")
DATA_OFFSET = 4096
ALIGN = 64
TENSOR_MARK = "__memfit_tensor__"
SLOTS_PER_RANK = 2
NEVER_WRITTEN = "empty (reserved, never written)"
INDEX_ALLOWANCE_BYTES = 1 << 16  # room kept for the index beyond its size at the last estimate
READ_CHUNK_BYTES = 512 << 10  # a read_into chunk: hashed while it is still in a core's L2 cache


def slot_path(shm_dir: str, rank: int, slot: int) -> str:
    return os.path.join(shm_dir, f"rank{rank}.slot{slot}")


def align_to(value: int, to: int = ALIGN) -> int:
    """value rounded up to a multiple of to."""
    return (value + to - 1) // to * to


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in a slot index")
    return dtype


def _without_tensors(tree, prefix: str = ""):
    if torch.is_tensor(tree):
        return {TENSOR_MARK: prefix}
    if isinstance(tree, dict):
        return {key: _without_tensors(value, f"{prefix}/{key}" if prefix else str(key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [
            _without_tensors(value, f"{prefix}/{index}" if prefix else str(index)) for index, value in enumerate(tree)
        ]
        return tuple(items) if isinstance(tree, tuple) else items  # a client's tuple comes back a tuple
    return tree


def _with_tensors(tree, tensor_of):
    if isinstance(tree, dict):
        if set(tree) == {TENSOR_MARK}:
            return tensor_of(tree[TENSOR_MARK])
        return {key: _with_tensors(value, tensor_of) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_with_tensors(value, tensor_of) for value in tree)
    return tree


class SlotDataError(CheckpointError):
    """A tensor of a slot does not match its checksum, or the file ends inside it."""


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain values only: an index that names a class is refused, not executed."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a slot index may hold plain values only, found {module}.{name}")


def layout(payload: dict) -> tuple[list[tuple[str, torch.Tensor, int]], int]:
    """([(path, tensor, offset)], bytes of tensor data) for a payload's tensors in the slot."""
    placed, offset = [], DATA_OFFSET
    for path, tensor in walk_tensors(payload):
        placed.append((path, tensor, offset))
        offset = align_to(offset + tensor.numel() * tensor.element_size())
    return placed, offset - DATA_OFFSET


def needed_bytes(payload: dict) -> int:
    """Slot size that holds payload, with room for its index."""
    _, data_bytes = layout(payload)
    index_bytes = len(pickle.dumps(_without_tensors(payload))) + 200 * sum(1 for _ in walk_tensors(payload))
    return align_to(DATA_OFFSET + data_bytes + index_bytes + INDEX_ALLOWANCE_BYTES, 1 << 20)


class MappedFile:
    """A preallocated file mapped read-write, as bytes, for as long as it is in use."""

    def __init__(self, path: str):
        self.path = path
        self._file = os.fdopen(open_existing(path, os.O_RDWR), "r+b")  # never through a planted symlink
        self.num_bytes = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), self.num_bytes)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def close(self) -> None:
        del self.bytes
        self._map.close()
        self._file.close()


class SlotFile(MappedFile):
    """A slot file mapped read-write (the worker that fills it) for as long as it is in use."""

    def sequence(self) -> int:
        magic, sequence, *_ = HEADER.unpack_from(self._map, 0)
        return sequence if magic == MAGIC else 0

    def used_bytes(self) -> int:
        """Bytes from the start of the file to the end of the committed index."""
        _, _, _, index_offset, index_bytes, _ = HEADER.unpack_from(self._map, 0)
        return index_offset + index_bytes

    def write_committed(self, data: torch.Tensor) -> None:
        """Writes the bytes of a committed slot (a rebuilt one), its sequence last."""
        if data.numel() > self.num_bytes or data.numel() < DATA_OFFSET:
            raise CheckpointError(f"{self.path}: {data.numel()} bytes do not form a slot of {self.num_bytes}")
        self.invalidate()
        self.bytes[16 : data.numel()] = data[16:]
        self.bytes[:16] = data[:16]

    def invalidate(self) -> None:
        """Marks the slot as being written, before any of its bytes change."""
        HEADER.pack_into(self._map, 0, MAGIC, 0, -1, 0, 0, 0)

    def copy_tensor(self, tensor: torch.Tensor, offset: int) -> str:
        """Copies tensor's bytes to offset; returns their digest."""
        num_bytes = tensor.numel() * tensor.element_size()
        target = self.bytes[offset : offset + num_bytes]
        if num_bytes:
            target.copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        return xxhash.xxh3_64_hexdigest(target.numpy())

    def commit(self, step: int, sequence: int, index: dict) -> None:
        """Writes the index after the tensor bytes, then the header, the sequence last."""
        data = pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)
        end = max([entry[3] + entry[4] for entry in index["tensors"]], default=DATA_OFFSET)
        index_offset = align_to(end)
        if index_offset + len(data) > self.num_bytes:
            raise CheckpointError(f"{self.path}: index does not fit ({index_offset + len(data)} > {self.num_bytes})")
        self._map[index_offset : index_offset + len(data)] = data
        digest = xxhash.xxh3_64_intdigest(data)
        HEADER.pack_into(self._map, 0, MAGIC, 0, step, index_offset, len(data), digest)
        struct.pack_into("<Q", self._map, 8, sequence)


def map_copy_on_write(path: str, min_bytes: int, what: str) -> tuple[mmap.mmap, int]:
    """Maps a file for reading, copy-on-write, and its size; CheckpointError naming the path when
    it cannot be read or is shorter than a header."""
    with _open_for_reading(path, min_bytes, what) as file:
        return _map(file, path)


def _open_for_reading(path: str, min_bytes: int, what: str):
    """The file opened for reading, unbuffered; CheckpointError as map_copy_on_write."""
    try:
        file = os.fdopen(open_existing(path, os.O_RDONLY), "rb", buffering=0)
    except OSError as error:
        raise CheckpointError(f"{path}: {error.strerror}" if error.strerror else str(error)) from None
    size = os.fstat(file.fileno()).st_size
    if size < min_bytes:
        file.close()
        raise CheckpointError(f"{path}: {size} bytes, too short for a {what}")
    return file


def _map(file, path: str) -> tuple[mmap.mmap, int]:
    size = os.fstat(file.fileno()).st_size
    try:
        return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY), size
    except OSError as error:
        raise CheckpointError(f"{path}: {error.strerror}" if error.strerror else str(error)) from None


class SlotReader:
    """A committed slot, mapped copy-on-write: tensors are views of the file's pages (zero-copy)
    until written. Raises CheckpointError for an empty, torn or corrupted slot.

    A restore copies tensors out with read_into instead: large reads of the open file straight into
    the target tensor, hashed chunk by chunk while each chunk is still in the CPU's cache. The
    mapping's 4 KiB shared-memory pages are then never faulted in, and each byte leaves memory once
    (a checksum pass over the mapping followed by a copy reads it twice)."""

    def __init__(self, path: str):
        self.path = path
        self._file = _open_for_reading(path, DATA_OFFSET, "slot")
        try:
            self._map, size = _map(self._file, path)
        except CheckpointError:
            self._file.close()
            raise
        magic, self.sequence, self.step, index_offset, index_bytes, digest = HEADER.unpack_from(self._map, 0)
        if magic == bytes(len(MAGIC)):
            raise CheckpointError(f"{path}: {NEVER_WRITTEN}")
        if magic != MAGIC:
            raise CheckpointError(f"{path}: not a snapshot slot (bad magic)")
        if self.sequence == 0:
            raise CheckpointError(f"{path}: empty or being written (no committed snapshot)")
        if index_offset + index_bytes > size:
            raise CheckpointError(f"{path}: index beyond the end of the slot (corrupted header)")
        self.used_bytes = index_offset + index_bytes
        data = self._map[index_offset : index_offset + index_bytes]
        if xxhash.xxh3_64_intdigest(data) != digest:
            raise CheckpointError(f"{path}: index checksum mismatch (corrupted index)")
        try:
            self.index = _PlainUnpickler(io.BytesIO(data)).load()
        except Exception as error:
            raise CheckpointError(f"{path}: unreadable index ({error})") from None
        if self.index.get("step") != self.step:
            raise CheckpointError(f"{path}: header step {self.step}, index step {self.index.get('step')}")
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._entries = {entry[0]: entry for entry in self.index["tensors"]}
        self._verified: set[str] = set()

    def tensor(self, path: str, verify: bool = True) -> torch.Tensor:
        entry = self._entries.get(path)
        if entry is None:
            raise CheckpointError(f"{self.path}: no tensor {path!r}")
        if verify and path not in self._verified:
            self._check(path)
        _, dtype_name, shape, offset, num_bytes, _ = entry
        return self._bytes[offset : offset + num_bytes].view(_dtype(dtype_name)).reshape(shape)

    def _check(self, path: str) -> None:
        _, _, _, offset, num_bytes, digest = self._entries[path]
        if xxhash.xxh3_64_hexdigest(self._bytes[offset : offset + num_bytes].numpy()) != digest:
            raise SlotDataError(f"{self.path}: checksum mismatch in tensor {path!r} (corrupted data)")
        self._verified.add(path)

    def can_read_into(self, path: str, target: torch.Tensor) -> bool:
        """Whether read_into can fill target byte for byte (same dtype and size, contiguous, CPU)."""
        entry = self._entries.get(path)
        return (
            entry is not None
            and target.device.type == "cpu"
            and target.is_contiguous()
            and str(target.dtype) == entry[1]
            and list(target.shape) == list(entry[2])
        )

    def read_into(self, path: str, target: torch.Tensor, verify: bool = True) -> None:
        """Reads the tensor at path into target (can_read_into must hold), hashing it on the way
        when verify and not checked yet; CheckpointError on a mismatch, with target already
        overwritten: the caller restores another step over it."""
        _, _, _, offset, num_bytes, digest = self._entries[path]
        verify = verify and path not in self._verified
        hasher = xxhash.xxh3_64() if verify else None
        view = memoryview(target.detach().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < num_bytes:
            chunk = view[done : done + READ_CHUNK_BYTES]
            try:
                got = os.preadv(self._file.fileno(), [chunk], offset + done)
            except OSError as error:
                raise SlotDataError(f"{self.path}: reading tensor {path!r}: {error.strerror or error}") from None
            if got <= 0:  # the file shrank after it was opened
                raise SlotDataError(f"{self.path}: ends inside tensor {path!r} (truncated)")
            if hasher is not None:
                hasher.update(chunk[:got])  # still in the cache the read just filled
            done += got
        if hasher is not None:
            if hasher.hexdigest() != digest:
                raise SlotDataError(f"{self.path}: checksum mismatch in tensor {path!r} (corrupted data)")
            self._verified.add(path)

    def data(self) -> torch.Tensor:
        """The slot's committed bytes (header, tensors, index), as parity covers them."""
        return self._bytes[: self.used_bytes]

    def verify(self) -> None:
        """Checks every tensor, on as many threads as torch's intra-op pool (XXH3 releases the
        GIL); raises CheckpointError naming the first bad one in the slot's order."""
        pending = [path for path in self._entries if path not in self._verified]
        num_threads = min(torch.get_num_threads(), len(pending))
        if num_threads <= 1:
            for path in pending:
                self._check(path)
            return
        with ThreadPoolExecutor(num_threads, thread_name_prefix="memfit-verify") as pool:
            checks = [pool.submit(self._check, path) for path in pending]
        for check in checks:
            check.result()

    def payload(self, verify: bool = True) -> dict:
        """The payload with its tensors as views of the slot."""
        return _with_tensors(self.index["meta"], lambda path: self.tensor(path, verify))

    @property
    def num_bytes(self) -> int:
        return sum(entry[4] for entry in self.index["tensors"])


def tensor_entry(path: str, tensor: torch.Tensor, offset: int, digest: str) -> tuple:
    return (path, str(tensor.dtype), list(tensor.shape), offset, tensor.numel() * tensor.element_size(), digest)


def index_for(payload: dict, step: int, world_size: int, rank: int, owner_of: dict, entries: list) -> dict:
    return {
        "step": step,
        "world_size": world_size,
        "rank": rank,
        "owner_of": owner_of,
        "meta": _without_tensors(payload),
        "tensors": entries,
    }


def newest_committed(shm_dir: str, rank: int, problems: list | None = None) -> list[SlotReader]:
    """The rank's committed slots, newest first; unreadable ones are left out (and their reasons
    appended to problems; a missing file is no problem)."""
    readers = []
    for slot in range(SLOTS_PER_RANK):
        path = slot_path(shm_dir, rank, slot)
        try:
            readers.append(SlotReader(path))
        except CheckpointError as error:
            if problems is not None and os.path.lexists(path) and not str(error).endswith(NEVER_WRITTEN):
                problems.append(str(error))
    return sorted(readers, key=lambda reader: reader.sequence, reverse=True)


class SlotSource:
    """Committed slots of one step, one per rank, as a StateSource for restore_rank_state.

    checked_here are the ranks whose slots this process checks (default: all of readers); the
    others' slots are checked by their own ranks, and the ranks agree on the outcome before the
    restore counts. With check_as_read those checks happen while the tensors are copied out
    (copy_into), and finish() checks what no copy read: a mismatch then leaves the state partly
    overwritten, and the caller restores another step over it. every_rank: the slot of every rank
    is here, so each parameter can be read from its owner's slot instead of being broadcast."""

    def __init__(
        self,
        readers: dict[int, SlotReader],
        checked_here: set[int] | None = None,
        check_as_read: bool = False,
        every_rank: bool = False,
    ):
        any_reader = next(iter(readers.values()))
        self.world_size = any_reader.index["world_size"]
        self.owner_of = any_reader.index["owner_of"]
        self.fingerprint = any_reader.index.get("fingerprint")
        self.step = any_reader.step
        self.description = f"snapshot of step {self.step} in {os.path.dirname(any_reader.path)}"
        self.every_rank = every_rank and len(readers) == self.world_size
        self._readers = readers
        self._checked_here = set(readers) if checked_here is None else set(checked_here)
        self._check_as_read = check_as_read
        self._payloads: dict[int, dict] = {}

    def _reader(self, rank: int) -> SlotReader:
        if rank not in self._readers:
            raise CheckpointError(f"{self.description}: no slot of rank {rank} here")
        return self._readers[rank]

    def file_of(self, rank: int) -> str:
        return self._reader(rank).path

    def payload(self, rank: int) -> dict:
        """The rank's payload, built once: a restore asks for it once per tensor it owns."""
        if rank not in self._payloads:
            self._payloads[rank] = self._reader(rank).payload(verify=False)
        return self._payloads[rank]

    def tensor(self, rank: int, path: str) -> torch.Tensor:
        """A view of the tensor in the slot; checked first unless another rank checks it, or
        finish() will."""
        return self._reader(rank).tensor(path, verify=rank in self._checked_here and not self._check_as_read)

    def copy_into(self, rank: int, path: str, target: torch.Tensor) -> None:
        """Copies the tensor at path into target (same shape), converting its dtype if needed."""
        reader = self._reader(rank)
        if reader.can_read_into(path, target):
            reader.read_into(path, target, verify=rank in self._checked_here)
        else:
            target.copy_(self.tensor(rank, path))

    def finish(self) -> None:
        """Checks the tensors of the slots checked here that no copy has checked yet."""
        for rank in sorted(self._checked_here):
            self._readers[rank].verify()
