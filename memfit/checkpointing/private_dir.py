"""The snapshot slot directory as a private place: what memfit may trust in it, create in it and
delete from it.

A slot directory may exist before the job (a `snapshot.shm_dir` the user made, a directory left
by an earlier job with `keep_shm`, or one planted under /dev/shm by another local user). memfit
uses it only when the current user owns it and nobody else may write to it, since anyone who can
write there can plant a symlink named like a slot or a lock and make the job overwrite the file
it points at. Files are opened with O_NOFOLLOW (and created with O_EXCL), so a symlink is refused
rather than followed even where the directory checks pass.

Deleting: memfit removes the files it makes (slots, parity slots, the agent's socket and locks)
and the directory only when memfit created it, which a marker file records, and only when nothing
else is left in it.
"""

import os
import re
import stat

CREATED_MARKER = ".memfit-created"
_MEMFIT_FILE = re.compile(r"rank\d+\.(slot|parity)\d+|agent\.(sock|lock|spawn\.lock)|" + re.escape(CREATED_MARKER))
_HOW_TO_FIX = "point snapshot.shm_dir (or MEMFIT_SNAPSHOT_SHM_DIR) at a directory of your own"


class UnsafeDirectoryError(OSError):
    """A slot directory or file memfit must not use; the message names it and says why."""


def prepare_directory(path: str) -> None:
    """Creates path (mode 0700, marked as memfit's) or checks that an existing one is safe to use:
    a real directory, owned by the current user, writable by no one else, writable by us."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise UnsafeDirectoryError(
            f"{path}: cannot create the snapshot directory: {error.strerror}; {_HOW_TO_FIX}"
        ) from None
    else:
        os.close(open_private(os.path.join(path, CREATED_MARKER), os.O_WRONLY))
    check_directory(path)


def check_directory(path: str) -> None:
    try:
        info = os.lstat(path)
    except OSError as error:
        raise UnsafeDirectoryError(f"{path}: {error.strerror}; {_HOW_TO_FIX}") from None
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectoryError(f"{path}: is a symlink, not a directory; {_HOW_TO_FIX}")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectoryError(f"{path}: not a directory; {_HOW_TO_FIX}")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectoryError(
            f"{path}: owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}); refusing to keep snapshots "
            f"in a directory someone else prepared; {_HOW_TO_FIX}"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectoryError(
            f"{path}: writable by other users (mode {stat.S_IMODE(info.st_mode):o}); refusing to keep snapshots "
            f"there; chmod go-w it or {_HOW_TO_FIX}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise UnsafeDirectoryError(f"{path}: read-only (a read-only file system or no write permission); {_HOW_TO_FIX}")


def open_private(path: str, flags: int, mode: int = 0o600) -> int:
    """A descriptor of path, a regular file: created (mode 0600) with O_EXCL when missing, opened
    without following a symlink when present. A symlink or other non-file raises naming it."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        pass
    except OSError as error:
        raise UnsafeDirectoryError(f"{path}: cannot create: {error.strerror}; {_HOW_TO_FIX}") from None
    return open_existing(path, flags)


def open_existing(path: str, flags: int) -> int:
    """A descriptor of an existing regular file, never through a symlink."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW)
    except OSError:
        if os.path.islink(path):
            raise UnsafeDirectoryError(f"{path}: is a symlink; refusing to follow it; {_HOW_TO_FIX}") from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise UnsafeDirectoryError(f"{path}: not a regular file; {_HOW_TO_FIX}")
    return descriptor


def remove_created(path: str, keep_slots: bool = False) -> None:
    """Removes the files memfit makes in path (all but the slots and parity slots with keep_slots),
    then path itself if memfit created it and nothing else is left in it."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        if _MEMFIT_FILE.fullmatch(name) and name != CREATED_MARKER and not (keep_slots and name.startswith("rank")):
            _unlink_quietly(os.path.join(path, name))
    try:
        if set(os.listdir(path)) == {CREATED_MARKER}:
            os.unlink(os.path.join(path, CREATED_MARKER))
            os.rmdir(path)
    except OSError:
        pass  # something else arrived meanwhile: it stays


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
