"""XOR parity of snapshot slots across nodes: the rotated (RAID-5) layout, and the parity slot
files that hold one member's parity in the node's shared memory.

Layout. A parity group is the ranks with the same local rank on each of the N nodes (member i
lives on node i). Every member's data (the used bytes of its committed slot, header and index
included) is padded with zeros to a common length and cut into k = N - 1 parts of `part_bytes`.
Member i gives its part `part_index(i, d)` to every other member d; member d keeps
    P_d = XOR over i != d of part(i, part_index(i, d))
so a member never holds parity of its own data, and each stripe's parity sits on the one member
that holds no data part of that stripe. Per member the parity is 1/k of the data: a full copy of
the other node's snapshot with two nodes, half of one with three. A lost member f is rebuilt part
by part: the part held by survivor d is P_d XOR the parts the other survivors gave to d.

A parity slot file (little-endian), with the commit rules of a data slot (slots.py):
    0     magic "MFPAR001"
    8     sequence (u64): 0 while the slot is being written; set last
    16    step (i64)
    24    metadata offset (u64), 32 metadata length (u64), 40 metadata digest (u64, XXH3)
    48    parity digest (u64, XXH3 of the parity bytes)
    4096  the parity bytes (part_bytes)
    then  the metadata, JSON: {"step", "world_size", "group", "member", "part_bytes",
          "data_bytes": [per member], "data_digests": [per member, XXH3 hex]}
A parity slot that is torn, truncated or fails a checksum is never used.
"""

import json
import os
import struct

import torch
import xxhash

from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.slots import MappedFile, map_copy_on_write

MAGIC = b"MFPAR001"
HEADER = struct.Struct("<8sQqQQQQ")
DATA_OFFSET = 4096
PART_ALIGN = 64  # parts are XORed as int64 words, and stay cache-line aligned
PARITY_SLOTS_PER_RANK = 2
METADATA_ALLOWANCE_BYTES = 1 << 16


def parity_path(shm_dir: str, rank: int, slot: int) -> str:
    return os.path.join(shm_dir, f"rank{rank}.parity{slot}")


def part_index(member: int, holder: int, num_members: int) -> int:
    """Which part of member's data goes into holder's parity; num_members - 1 (no part) when
    holder is member itself."""
    return (holder - member - 1) % num_members


def holder_of_part(member: int, part: int, num_members: int) -> int:
    """The member whose parity covers `part` of member's data."""
    return (member + part + 1) % num_members


def part_bytes_for(data_bytes: list[int]) -> int:
    """Bytes per part for members holding data_bytes each."""
    num_parts = len(data_bytes) - 1
    if num_parts < 1:
        raise ValueError(f"XOR parity needs two or more members, got {len(data_bytes)}")
    largest = max(data_bytes)
    per_part = -(-largest // num_parts)
    return max(PART_ALIGN, -(-per_part // PART_ALIGN) * PART_ALIGN)


def slot_file_bytes(part_bytes: int) -> int:
    """Size of a parity slot file for parts of part_bytes."""
    return -(-(DATA_OFFSET + part_bytes + METADATA_ALLOWANCE_BYTES) // (1 << 20)) * (1 << 20)


def data_part(data: torch.Tensor, part: int, part_bytes: int) -> torch.Tensor:
    """Part `part` of a member's data (uint8), padded with zeros: a view where the part lies
    inside the data, else a copy."""
    start, end = part * part_bytes, (part + 1) * part_bytes
    if end <= data.numel():
        return data[start:end]
    padded = torch.zeros(part_bytes, dtype=torch.uint8)
    if start < data.numel():
        padded[: data.numel() - start] = data[start:]
    return padded


def encode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every member's parity for the members' data, in one process: the reference the exchange
    over a process group is checked against."""
    num_members = len(datas)
    part_bytes = part_bytes_for([data.numel() for data in datas])
    parities = []
    for holder in range(num_members):
        parity = torch.zeros(part_bytes // 8, dtype=torch.int64)
        for member, data in enumerate(datas):
            if member != holder:
                parity ^= data_part(data, part_index(member, holder, num_members), part_bytes).view(torch.int64)
        parities.append(parity.view(torch.uint8))
    return parities


def rebuild(lost: int, data_bytes: int, datas: dict[int, torch.Tensor], parities: dict[int, torch.Tensor]):
    """The lost member's data from the survivors' data and parity, in one process (reference)."""
    num_members = len(datas) + 1
    part_bytes = next(iter(parities.values())).numel()
    rebuilt = torch.zeros((num_members - 1) * part_bytes, dtype=torch.uint8)
    for holder, parity in parities.items():
        word = parity.clone().view(torch.int64)
        for member, data in datas.items():
            if member != holder:
                word ^= data_part(data, part_index(member, holder, num_members), part_bytes).view(torch.int64)
        part = part_index(lost, holder, num_members)
        rebuilt[part * part_bytes : (part + 1) * part_bytes] = word.view(torch.uint8)
    return rebuilt[:data_bytes]


class ParityFile(MappedFile):
    """A parity slot file mapped read-write by the member that fills it."""

    def invalidate(self) -> None:
        HEADER.pack_into(self._map, 0, MAGIC, 0, -1, 0, 0, 0, 0)

    def parity(self, part_bytes: int) -> torch.Tensor:
        """Where the parity bytes go."""
        if DATA_OFFSET + part_bytes > self.num_bytes:
            raise CheckpointError(f"{self.path}: {self.num_bytes} bytes, too small for a part of {part_bytes}")
        return self.bytes[DATA_OFFSET : DATA_OFFSET + part_bytes]

    def commit(self, step: int, sequence: int, metadata: dict, parity_digest: int | None = None) -> None:
        """Writes the metadata and the checksums, then the sequence last. parity_digest: the XXH3 of
        the parity bytes where the caller hashed them as they were written, else computed here."""
        part_bytes = metadata["part_bytes"]
        text = json.dumps(metadata).encode()
        metadata_offset = DATA_OFFSET + part_bytes
        if metadata_offset + len(text) > self.num_bytes:
            raise CheckpointError(f"{self.path}: parity metadata does not fit")
        self._map[metadata_offset : metadata_offset + len(text)] = text
        if parity_digest is None:
            parity_digest = xxhash.xxh3_64_intdigest(self.parity(part_bytes).numpy())
        metadata_digest = xxhash.xxh3_64_intdigest(text)
        HEADER.pack_into(self._map, 0, MAGIC, 0, step, metadata_offset, len(text), metadata_digest, parity_digest)
        struct.pack_into("<Q", self._map, 8, sequence)


class ParityReader:
    """A committed parity slot, verified: raises CheckpointError for a torn, truncated or
    corrupted one."""

    def __init__(self, path: str):
        self.path = path
        self._map, size = map_copy_on_write(path, DATA_OFFSET, "parity slot")
        magic, self.sequence, self.step, offset, length, metadata_digest, parity_digest = HEADER.unpack_from(self._map)
        if magic != MAGIC:
            raise CheckpointError(f"{path}: not a parity slot (bad magic)")
        if self.sequence == 0:
            raise CheckpointError(f"{path}: empty or being written (no committed parity)")
        if offset + length > size:
            raise CheckpointError(f"{path}: metadata beyond the end of the file (truncated)")
        text = self._map[offset : offset + length]
        if xxhash.xxh3_64_intdigest(text) != metadata_digest:
            raise CheckpointError(f"{path}: metadata checksum mismatch (corrupted)")
        self.metadata = json.loads(text)
        part_bytes = self.metadata["part_bytes"]
        if self.metadata["step"] != self.step or DATA_OFFSET + part_bytes > offset:
            raise CheckpointError(f"{path}: header and metadata disagree (corrupted)")
        self.parity = torch.frombuffer(self._map, dtype=torch.uint8)[DATA_OFFSET : DATA_OFFSET + part_bytes]
        if xxhash.xxh3_64_intdigest(self.parity.numpy()) != parity_digest:
            raise CheckpointError(f"{path}: parity checksum mismatch (corrupted parity of step {self.step})")


def committed_parity(shm_dir: str, rank: int) -> list[ParityReader]:
    """The rank's verified parity slots, newest first."""
    readers = []
    for slot in range(PARITY_SLOTS_PER_RANK):
        path = parity_path(shm_dir, rank, slot)
        if not os.path.exists(path):
            continue
        try:
            readers.append(ParityReader(path))
        except CheckpointError:
            continue
    return sorted(readers, key=lambda reader: reader.sequence, reverse=True)


def parity_problems(shm_dir: str, rank: int) -> list[str]:
    """Why each of the rank's parity slot files that exists cannot be used."""
    problems = []
    for slot in range(PARITY_SLOTS_PER_RANK):
        path = parity_path(shm_dir, rank, slot)
        if os.path.exists(path):
            try:
                ParityReader(path)
            except CheckpointError as error:
                problems.append(str(error))
    return problems
