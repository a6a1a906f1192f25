"""Checkpoints on disk: one payload file per rank and a manifest, committed atomically.

    <dir>/<tag>/rank<r>.pt       torch.save of the rank's payload (see state.py); weights_only
    <dir>/<tag>/manifest.json    written last: step, world size, owner of each tensor, and per
                                 file its size and the XXH3 digests of the file, of its non-tensor
                                 content and of every tensor; the manifest carries its own digest
    <dir>/latest                 the newest complete tag

Commit protocol. Ranks write into <dir>/.tmp-<tag>/ and fsync their files; the ranks then agree
that every write succeeded (one exchange of status: a failure on one rank, ENOSPC say, fails the
save on every rank instead of hanging the others); rank 0 writes and fsyncs the manifest, swaps
the directory into place (renameat2 RENAME_EXCHANGE when a tag is re-saved, so the old one stays
whole until the new one is), fsyncs <dir>, and replaces `latest` by rename. A save killed at any
moment leaves the previous checkpoint and `latest` untouched; .tmp-* directories are never read
and the next save removes them.

Loading verifies what it uses: each file read has its non-tensor content and each tensor taken
checked against the manifest, and its step checked against the manifest's. A failure raises
CheckpointError naming the file and the tensor, on every rank.
"""

import ctypes
import json
import logging
import os
import shutil

import torch
import torch.distributed as dist

from memfit.checkpointing.client_state import client_state_problem
from memfit.checkpointing.faults import fault_point
from memfit.checkpointing.integrity import (
    CheckpointError,
    HashingWriter,
    describe_os_error,
    file_digest,
    fsync_directory,
    metadata_digest,
    payload_digests,
    tensor_digest,
)
from memfit.checkpointing.state import export_rank_state, restore_rank_state

logger = logging.getLogger("memfit")

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "memfit-checkpoint"
FORMAT_VERSION = 2
TEMPORARY_PREFIX = ".tmp-"
REPLACED_PREFIX = ".old-"
DEFAULT_TAG_PREFIX = "global_step"


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.pt"


def access_modes(group_access: bool) -> tuple[int, int]:
    """(file mode, directory mode): training state is private to its owner unless the config's
    checkpoint.group_access shares it with the owner's group (read only)."""
    return (0o640, 0o750) if group_access else (0o600, 0o700)


def make_directory(path: str, directory_mode: int, exist_ok: bool = False) -> None:
    """Creates path (and missing parents) with directory_mode exactly, whatever the umask; an
    existing directory keeps its mode (it is the user's)."""
    if exist_ok and os.path.isdir(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, directory_mode)
    except FileExistsError:
        if exist_ok:  # made meanwhile by another writer (another node's agent)
            return
        raise
    os.chmod(path, directory_mode)


# ---- saving -------------------------------------------------------------------------------------
def save_checkpoint(engine, save_dir, tag=None, client_state=None, *, keep: int | None = None) -> str:
    """Writes the engine's state under save_dir/tag on every rank; returns the tag directory.
    keep: after the commit, delete all but the newest `keep` global_step<N> checkpoints."""
    save_dir = os.path.abspath(os.fspath(save_dir))
    tag = tag or f"{DEFAULT_TAG_PREFIX}{engine.global_step}"
    _check_tag(tag)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep: expected a positive number of checkpoints, got {keep!r}")
    final_dir = os.path.join(save_dir, tag)
    temporary_dir = os.path.join(save_dir, TEMPORARY_PREFIX + tag)
    file_mode, directory_mode = access_modes(engine.config.checkpoint.group_access)
    problem = client_state_problem(client_state)
    try:  # refused on every rank, before anything is written, if any rank's state would not load
        _agree(engine, problem and f"save_checkpoint: {problem}")
    except CheckpointError as refused:
        raise ValueError(str(refused)) from None
    error = None
    if engine.rank == 0:
        error = _attempt(lambda: _prepare_directory(save_dir, temporary_dir, directory_mode))
    _agree(engine, error)

    entry, error = None, None
    try:
        payload = export_rank_state(engine, client_state or {})
        entry = _write_payload(payload, os.path.join(temporary_dir, rank_file_name(engine.rank)), file_mode)
        fault_point("checkpoint-file-written", engine.rank)
    except CheckpointError as failure:
        error = str(failure)
    try:
        entries = _agree(engine, error, entry)
    except CheckpointError:
        if engine.rank == 0:  # every rank has finished writing: nothing half-written stays
            shutil.rmtree(temporary_dir, ignore_errors=True)
        raise

    error = None
    if engine.rank == 0:
        error = _attempt(lambda: _commit(engine, save_dir, tag, temporary_dir, final_dir, entries, keep, file_mode))
        if error:
            shutil.rmtree(temporary_dir, ignore_errors=True)
    _agree(engine, error)
    return final_dir


def _check_tag(tag: str) -> None:
    if not isinstance(tag, str) or not tag or "/" in tag or tag in (".", "..") or tag.startswith("."):
        raise ValueError(f"tag: expected a plain directory name not starting with '.', got {tag!r}")


def _attempt(action) -> str | None:
    try:
        action()
    except CheckpointError as failure:
        return str(failure)
    return None


def _prepare_directory(save_dir: str, temporary_dir: str, directory_mode: int) -> None:
    try:
        make_directory(save_dir, directory_mode, exist_ok=True)
        for name in os.listdir(save_dir):  # leftovers of saves that were killed
            if name.startswith(TEMPORARY_PREFIX):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        make_directory(temporary_dir, directory_mode)
    except OSError as error:
        raise CheckpointError(describe_os_error(error, error.filename or save_dir)) from None


def _write_payload(payload: dict, path: str, file_mode: int = 0o600) -> dict:
    """Saves payload to path (file_mode) and fsyncs it; returns its manifest entry."""
    digests = payload_digests(payload)
    writer = None
    try:
        with _open_for_writing(path, file_mode) as file:
            writer = HashingWriter(file)
            torch.save(payload, writer)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise CheckpointError(describe_os_error(error, path)) from None
    except RuntimeError as error:  # torch re-raises a failed write as a RuntimeError
        if writer is not None and writer.error is not None:
            raise CheckpointError(describe_os_error(writer.error, path)) from None
        raise CheckpointError(f"{path}: {error}") from None
    return {
        "file": os.path.basename(path),
        "bytes": writer.num_bytes,
        "file_digest": writer.hasher.hexdigest(),
        "global_step": payload["global_step"],
        **digests,
    }


def _agree(engine, error: str | None, value=None) -> list:
    """Every rank learns whether any rank failed; on failure all of them raise the first
    failure's message. Returns each rank's value."""
    if engine.world_size == 1:
        results = [(error, value)]
    else:
        results = [None] * engine.world_size
        dist.all_gather_object(results, (error, value))
    failures = [(rank, message) for rank, (message, _) in enumerate(results) if message]
    if failures:
        rank, message = failures[0]
        raise CheckpointError(message if rank == engine.rank or engine.world_size == 1 else f"rank {rank}: {message}")
    return [value for _, value in results]


def _commit(engine, save_dir, tag, temporary_dir, final_dir, entries, keep, file_mode) -> None:
    body = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tag": tag,
        "global_step": engine.global_step,
        "micro_step": engine.micro_step,
        "world_size": engine.world_size,
        "stage": engine.stage,
        "owner_of": {name: owner if engine.stage > 0 else 0 for name, owner in engine.ownership()["owner_of"].items()},
        "files": {entry["file"]: entry for entry in entries},
        "job": engine.job_id,
        "fingerprint": engine.fingerprint,
    }
    try:
        _write_durably(os.path.join(temporary_dir, MANIFEST), json.dumps(_sealed(body), indent=1), file_mode)
        fsync_directory(temporary_dir)
        fault_point("checkpoint-manifest-written")
        _swap_into_place(temporary_dir, final_dir)
        fsync_directory(save_dir)
        fault_point("checkpoint-in-place")
        _write_durably(os.path.join(save_dir, LATEST + ".tmp"), tag, file_mode)
        os.replace(os.path.join(save_dir, LATEST + ".tmp"), os.path.join(save_dir, LATEST))
        fsync_directory(save_dir)
    except OSError as error:
        raise CheckpointError(describe_os_error(error, error.filename or save_dir)) from None
    if keep is not None:
        _rotate(save_dir, keep, protect=tag)


def _sealed(body: dict) -> dict:
    return {"manifest_digest": metadata_digest(body), **body}


def _open_for_writing(path: str, file_mode: int):
    """path truncated for writing, with file_mode exactly (whatever the umask or an earlier mode)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
    os.fchmod(descriptor, file_mode)
    return os.fdopen(descriptor, "wb")


def _write_durably(path: str, text: str, file_mode: int = 0o600) -> None:
    with _open_for_writing(path, file_mode) as file:
        file.write(text.encode())
        file.flush()
        os.fsync(file.fileno())


_RENAME_EXCHANGE = 2


def _swap_into_place(new_dir: str, final_dir: str) -> None:
    """Moves new_dir to final_dir. A tag that exists already is exchanged atomically with the new
    one and then removed, so at every instant final_dir is one complete checkpoint."""
    if not os.path.exists(final_dir):
        os.rename(new_dir, final_dir)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_cwd = -100
    if renameat2 is not None and renameat2(at_cwd, new_dir.encode(), at_cwd, final_dir.encode(), _RENAME_EXCHANGE) == 0:
        fault_point("checkpoint-exchanged")
        shutil.rmtree(new_dir)  # now holds the replaced checkpoint
        return
    # No atomic exchange here: move the old one aside first; loading looks there if the tag is
    # missing (a kill between the two renames).
    replaced = os.path.join(os.path.dirname(final_dir), REPLACED_PREFIX + os.path.basename(final_dir))
    shutil.rmtree(replaced, ignore_errors=True)
    os.rename(final_dir, replaced)
    os.rename(new_dir, final_dir)
    shutil.rmtree(replaced, ignore_errors=True)


def _rotate(save_dir: str, keep: int, protect: str) -> None:
    """Deletes all but the newest `keep` checkpoints named global_step<N>; tags the user named
    are never deleted."""
    tags = []
    for name in os.listdir(save_dir):
        if not (name.startswith(DEFAULT_TAG_PREFIX) and name[len(DEFAULT_TAG_PREFIX) :].isdigit()):
            continue
        manifest = read_manifest(os.path.join(save_dir, name), quiet=True)
        if manifest is not None:
            tags.append((manifest["global_step"], name))
    tags.sort(reverse=True)
    for _, name in tags[keep:]:
        if name != protect:
            _delete_directory(save_dir, name)


def _delete_directory(save_dir: str, name: str) -> None:
    """Hides the directory under a temporary name first (one atomic rename), so a kill during
    the deletion never leaves a tag with some of its files gone."""
    hidden = os.path.join(save_dir, f"{TEMPORARY_PREFIX}deleted-{name}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(os.path.join(save_dir, name), hidden)
    fault_point("checkpoint-rotating")
    shutil.rmtree(hidden, ignore_errors=True)


def _check_loads(path: str) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # an unsafe pickle: torch raises UnpicklingError; a damaged archive others
        raise CheckpointError(
            f"{path}: does not load as tensors and plain values (weights_only): {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}"
        ) from None


# ---- loading ------------------------------------------------------------------------------------
def resolve_tag(load_dir: str, tag: str | None) -> str:
    """The tag directory to load: tag, else the one `latest` names."""
    if tag is None:
        latest = os.path.join(load_dir, LATEST)
        try:
            with open(latest) as file:
                tag = file.read().strip()
        except FileNotFoundError:
            raise CheckpointError(f"{load_dir}: no checkpoint here (no '{LATEST}' file)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{latest}: unreadable: {error}") from None
        if not tag or "/" in tag or tag.startswith("."):
            raise CheckpointError(f"{latest}: does not name a checkpoint tag: {tag[:80]!r}")
    directory = os.path.join(load_dir, tag)
    if not os.path.isdir(directory):
        replaced = os.path.join(load_dir, REPLACED_PREFIX + tag)
        if os.path.isdir(replaced):
            return replaced
        raise CheckpointError(f"{directory}: no such checkpoint")
    return directory


def read_manifest(directory: str, quiet: bool = False) -> dict | None:
    """The manifest of a tag directory, checked; with quiet, None instead of an error."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as file:
            sealed = json.loads(file.read().decode())
        if not isinstance(sealed, dict) or sealed.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a memfit checkpoint manifest")
        if sealed.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format version {sealed.get('version')!r}, expected {FORMAT_VERSION}")
        body = {key: value for key, value in sealed.items() if key != "manifest_digest"}
        if sealed.get("manifest_digest") != metadata_digest(body):
            raise CheckpointError(f"{path}: manifest digest mismatch (the manifest is corrupted)")
        for key in ("global_step", "world_size", "owner_of", "files"):
            if key not in body:
                raise CheckpointError(f"{path}: manifest lacks {key!r}")
        return body
    except CheckpointError:
        if quiet:
            return None
        raise
    except FileNotFoundError:
        if quiet:
            return None
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if quiet:
            return None
        raise CheckpointError(f"{path}: unreadable manifest: {error}") from None


class DiskSource:
    """A checkpoint directory as a StateSource: files are opened lazily (memory-mapped), and
    only what a rank uses is read and verified."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manifest = read_manifest(directory)
        self.world_size = self.manifest["world_size"]
        self.owner_of = self.manifest["owner_of"]
        self.fingerprint = self.manifest.get("fingerprint")
        self.description = directory
        self._payloads: dict[int, dict] = {}

    def _entry(self, rank: int) -> tuple[str, dict]:
        name = rank_file_name(rank)
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{os.path.join(self.directory, MANIFEST)}: lists no file {name}")
        return os.path.join(self.directory, name), entry

    def file_of(self, rank: int) -> str:
        return self._entry(rank)[0]

    def payload(self, rank: int) -> dict:
        if rank in self._payloads:
            return self._payloads[rank]
        path, entry = self._entry(rank)
        try:
            size = os.path.getsize(path)
        except OSError as error:
            raise CheckpointError(describe_os_error(error, path)) from None
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # a damaged archive: torch raises RuntimeError, pickle errors, ...
            raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {str(error)[:200]})") from None
        if not isinstance(payload, dict) or metadata_digest(payload) != entry["metadata"]:
            raise CheckpointError(f"{path}: content differs from the manifest (non-tensor data corrupted)")
        if payload.get("global_step") != self.manifest["global_step"]:
            raise CheckpointError(
                f"{path}: step {payload.get('global_step')} but the manifest says {self.manifest['global_step']} "
                "(a file from another save)"
            )
        self._payloads[rank] = payload
        return payload

    def tensor(self, rank: int, path: str) -> torch.Tensor:
        payload = self.payload(rank)
        file_path, entry = self._entry(rank)
        value = payload
        for part in path.split("/"):
            if isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            elif isinstance(value, dict) and part in value:
                value = value[part]
            else:
                raise CheckpointError(f"{file_path}: no tensor {path!r}")
        if not torch.is_tensor(value):
            raise CheckpointError(f"{file_path}: {path!r} is not a tensor")
        expected = entry["tensors"].get(path)
        if expected is None or tensor_digest(value) != expected:
            raise CheckpointError(f"{file_path}: checksum mismatch in tensor {path!r} (corrupted data)")
        return value


def load_checkpoint(engine, load_dir, tag=None, *, load_optimizer_states: bool = True) -> dict:
    """Restores the engine from a checkpoint saved at any world size; returns its client_state.
    A failure on any rank raises CheckpointError on every rank."""
    load_dir = os.path.abspath(os.fspath(load_dir))
    client_state, error = None, None
    try:
        directory = resolve_tag(load_dir, tag)
        client_state = restore_rank_state(engine, DiskSource(directory), load_optimizer_states)
    except CheckpointError as failure:
        error = str(failure)
    _agree(engine, error)
    if engine.rank == 0:
        logger.info("resumed from %s (step %d)", directory, engine.global_step)
    return client_state


def verify_checkpoint(directory: str) -> list[str]:
    """Checks every file of a tag directory in full, and that it loads as tensors and plain values
    only (torch.load weights_only, as a restore loads it: matching checksums do not make a file
    with a malicious pickle safe); returns one line per problem."""
    problems = []
    try:
        manifest = read_manifest(directory)
    except CheckpointError as error:
        return [str(error)]
    for name, entry in sorted(manifest["files"].items()):
        path = os.path.join(directory, name)
        try:
            if file_digest(path) != entry["file_digest"]:
                source = DiskSource(directory)
                rank = int(name[len("rank") : -len(".pt")])
                for tensor_path in entry["tensors"]:
                    source.tensor(rank, tensor_path)
                problems.append(f"{path}: file checksum mismatch")
            else:
                _check_loads(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except OSError as error:
            problems.append(describe_os_error(error, path))
        except CheckpointError as error:
            problems.append(str(error))
    return problems
