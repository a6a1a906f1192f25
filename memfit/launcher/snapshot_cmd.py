"""`memfit snapshot ls [DIR]` and `memfit snapshot verify PATH`: what snapshots a slot directory
or a persist directory holds, and whether their checksums hold. With snapshot parity, a slot
directory (one node's) also holds parity slots: `ls` shows each one's step and which parts of
which ranks (on the other nodes) it covers.

DIR or PATH may be a slot directory (/dev/shm/memfit-<job>), one slot file, a persist directory
(the snapshot's persist.path) or one of its global_step<N> checkpoints. `ls` without DIR lists
every memfit slot directory under /dev/shm. `verify` exits 0 when everything checks, or 2 with a
line naming each bad file (and the tensor, where one is at fault).
"""

import glob
import os
import sys

EXIT_BAD = 2


def add_arguments(commands) -> None:
    snapshot = commands.add_parser("snapshot", help="list and verify in-memory and persisted snapshots")
    what = snapshot.add_subparsers(dest="what", required=True)
    ls = what.add_parser("ls", help="slots and persisted snapshots: step, size, status")
    ls.add_argument("dir", nargs="?", default=None, help="slot or persist directory (default: /dev/shm/memfit-*)")
    verify = what.add_parser("verify", help="check every checksum; exit 2 naming the bad file and tensor")
    verify.add_argument("path", help="slot directory or file, persist directory, or one persisted checkpoint")


def _slot_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "rank*.slot*")))


def _parity_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "rank*.parity*")))


def _parity_line(path: str) -> str:
    from memfit.checkpointing.integrity import CheckpointError
    from memfit.checkpointing.parity import ParityReader, part_index

    try:
        reader = ParityReader(path)
    except CheckpointError as error:
        return f"{path}  -  -  {str(error).removeprefix(path + ': ')}"
    metadata = reader.metadata
    group, member = metadata["group"], metadata["member"]
    num_members = len(group)
    covered = ", ".join(
        f"rank {rank} part {part_index(other, member, num_members) + 1}/{num_members - 1}"
        for other, rank in enumerate(group)
        if other != member
    )
    return (
        f"{path}  step {reader.step}  {_human(metadata['part_bytes'])}  parity (sequence {reader.sequence}) "
        f"on node {member} of {num_members}: XOR of {covered}"
    )


def _checkpoints(directory: str) -> list[str]:
    from memfit.checkpointing.disk import MANIFEST

    if os.path.exists(os.path.join(directory, MANIFEST)):
        return [directory]
    return sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith("global_step") and os.path.isdir(os.path.join(directory, name))
    )


def _human(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return str(num_bytes)


def list_directory(directory: str) -> list[str]:
    from memfit.checkpointing.disk import read_manifest
    from memfit.checkpointing.integrity import CheckpointError
    from memfit.checkpointing.slots import SlotReader

    lines = []
    for path in _slot_files(directory):
        try:
            reader = SlotReader(path)
            lines.append(
                f"{path}  step {reader.step}  {_human(reader.num_bytes)}  committed (sequence {reader.sequence})"
            )
        except CheckpointError as error:
            lines.append(f"{path}  -  -  {str(error).removeprefix(path + ': ')}")
    lines += [_parity_line(path) for path in _parity_files(directory)]
    for path in _checkpoints(directory):
        manifest = read_manifest(path, quiet=True)
        if manifest is None:
            lines.append(f"{path}  -  -  incomplete (no valid manifest)")
            continue
        num_bytes = sum(entry["bytes"] for entry in manifest["files"].values())
        lines.append(
            f"{path}  step {manifest['global_step']}  {_human(num_bytes)}  persisted, {manifest['world_size']} rank(s)"
        )
    return lines


def verify_path(path: str) -> list[str]:
    """One line per problem."""
    from memfit.checkpointing.disk import verify_checkpoint
    from memfit.checkpointing.integrity import CheckpointError
    from memfit.checkpointing.parity import ParityReader
    from memfit.checkpointing.slots import NEVER_WRITTEN, SlotReader

    def check_slot(slot_file: str, explicit: bool) -> list[str]:
        try:
            if ".parity" in os.path.basename(slot_file):
                ParityReader(slot_file)
            else:
                SlotReader(slot_file).verify()
        except CheckpointError as error:
            reasons = ("no committed snapshot", "no committed parity", NEVER_WRITTEN)
            if not explicit and any(reason in str(error) for reason in reasons):
                return []  # a slot not yet written, or being written: nothing to verify
            return [str(error)]
        return []

    if os.path.isfile(path):
        return check_slot(path, explicit=True)
    if not os.path.isdir(path):
        return [f"{path}: no such file or directory"]
    slots, checkpoints = _slot_files(path) + _parity_files(path), _checkpoints(path)
    if not slots and not checkpoints:
        return [f"{path}: holds no snapshot slot and no persisted snapshot"]
    problems = [problem for slot_file in slots for problem in check_slot(slot_file, explicit=False)]
    for checkpoint in checkpoints:
        problems += verify_checkpoint(checkpoint)
    return problems


def run(args) -> int:
    if args.what == "ls":
        directories = [args.dir] if args.dir else sorted(glob.glob("/dev/shm/memfit-*"))
        for directory in directories:
            if not os.path.isdir(directory):
                print(f"memfit snapshot ls: {directory}: no such directory", file=sys.stderr)
                return EXIT_BAD
            lines = list_directory(directory)
            print("\n".join(lines) if lines else f"{directory}: no snapshots")
        return 0
    problems = verify_path(args.path)
    for line in problems:
        print(f"memfit snapshot verify: {line}", file=sys.stderr)
    if not problems:
        print(f"{args.path}: all checksums match")
    return EXIT_BAD if problems else 0
