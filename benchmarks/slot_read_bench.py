"""Ways to copy a snapshot slot's tensors out of shared memory, one process, one thread: the CPU
seconds each takes (medians; CPU time, not wall time, so that other jobs on a shared machine do
not stretch it), and a check that each one produces the same bytes as the plain reference.

  reference      SlotReader.verify() (hash pass over the mapping), then copy_ from the mapping:
                 what a restore did before read_into
  populate+copy  the mapping populated at once (MADV_POPULATE_READ), then copy_ and hash per chunk
  read_into      SlotReader.read_into: large reads of the file into the tensor, hashed per chunk
  read_into, no hash   the same without the checksum (a slot another rank checks)

    python benchmarks/slot_read_bench.py                  # 516 MB of 4 MiB tensors
    python benchmarks/slot_read_bench.py --state-mb 64 --reps 3
"""

import argparse
import mmap
import shutil
import statistics
import tempfile
import time

import torch
import xxhash

from memfit.checkpointing import slots

MADV_POPULATE_READ = 22  # Linux 5.14; Python 3.11's mmap module does not name it


def write_slot(directory: str, state_mb: float) -> tuple[str, dict]:
    """A committed slot holding state_mb of 1024 x 1024 fp32 tensors; (its path, the payload)."""
    torch.manual_seed(0)
    count = max(1, round(state_mb * 1e6 / (4 << 20)))
    payload = {"params": {f"w{index}": torch.randn(1024, 1024) for index in range(count)}}
    path = slots.slot_path(directory, 0, 0)
    with open(path, "wb") as file:
        file.truncate(slots.needed_bytes(payload))
    slot = slots.SlotFile(path)
    placed, _ = slots.layout(payload)
    entries = [slots.tensor_entry(name, t, offset, slot.copy_tensor(t, offset)) for name, t, offset in placed]
    slot.commit(1, 1, slots.index_for(payload, 1, 1, 0, {}, entries))
    slot.close()
    return path, payload


def reference(path: str, targets: dict) -> None:
    reader = slots.SlotReader(path)
    reader.verify()
    for name, target in targets.items():
        target.copy_(reader.tensor(name))


def populate_and_copy(path: str, targets: dict) -> None:
    reader = slots.SlotReader(path)  # for the index and the checksums
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    mapped.madvise(MADV_POPULATE_READ)
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    for name, target in targets.items():
        _, _, _, offset, num_bytes, digest = reader._entries[name]
        source, into = data[offset : offset + num_bytes], target.view(-1).view(torch.uint8)
        hasher = xxhash.xxh3_64()
        for start in range(0, num_bytes, slots.READ_CHUNK_BYTES):
            end = start + slots.READ_CHUNK_BYTES
            into[start:end].copy_(source[start:end])
            hasher.update(into[start:end].numpy())
        assert hasher.hexdigest() == digest
    del data, source
    mapped.close()


def read_into(path: str, targets: dict, verify: bool = True) -> None:
    reader = slots.SlotReader(path)
    for name, target in targets.items():
        reader.read_into(name, target, verify=verify)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=float, default=516, help="slot size, MB (default 516)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each way (default 5)")
    parser.add_argument("--dir", default="/dev/shm", help="directory of the slot (default /dev/shm)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    directory = tempfile.mkdtemp(prefix="slot-read-bench-", dir=args.dir)
    try:
        path, payload = write_slot(directory, args.state_mb)
        expected = {f"params/{name}": tensor for name, tensor in payload["params"].items()}
        ways = {
            "reference": reference,
            "populate+copy": populate_and_copy,
            "read_into": read_into,
            "read_into, no hash": lambda path, targets: read_into(path, targets, verify=False),
        }
        seconds = {way: [] for way in ways}
        for _ in range(args.reps):
            for way, copy in ways.items():  # interleaved: a burst of load hits every way alike
                targets = {name: torch.zeros_like(tensor) for name, tensor in expected.items()}
                started = time.thread_time()
                copy(path, targets)
                seconds[way].append(time.thread_time() - started)
                assert all(torch.equal(targets[name], tensor) for name, tensor in expected.items()), way
        num_bytes = sum(t.numel() * t.element_size() for t in expected.values())
        print(f"{num_bytes / 1e6:.0f} MB in {len(expected)} tensors; CPU seconds, median of {args.reps}")
        print("| way | CPU seconds | GB/s |\n| --- | --- | --- |")
        for way, values in seconds.items():
            median = statistics.median(values)
            print(f"| {way} | {median:.4f} | {num_bytes / median / 1e9:.1f} |")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
