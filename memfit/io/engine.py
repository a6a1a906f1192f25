"""Backend selection and the shared engines. Engines are shared per (backend, block size, queue
depth), so many files and many requests in flight share one ring or one worker pool.

Engines belong to the process that created them: a child of fork() has none of their threads, so
it forgets them and creates its own on first use (see AsyncFile for files opened before a fork).
"""

import os
import threading

from memfit.io import native
from memfit.io.pyengine import ALIGNMENT, PyEngine
from memfit.units import parse_size

DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_QUEUE_DEPTH = 32
MAX_BLOCK_SIZE = 1 << 30
BACKENDS = ("io_uring", "threads", "python")

_engines: dict = {}
_engines_lock = threading.Lock()
_default_geometry = (DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH)


def _forget_engines_after_fork() -> None:
    global _engines_lock
    _engines_lock = threading.Lock()  # another thread may have held it at the fork
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_after_fork)


def available_backends() -> list[str]:
    """The backends this process can use, fastest first."""
    found = []
    if native.uring_available():
        found.append("io_uring")
    if native._C is not None:
        found.append("threads")
    found.append("python")
    return found


def backend(requested: str = "auto") -> str:
    """The backend that requested resolves to. 'auto' honours MEMFIT_IO_BACKEND, then picks the
    fastest available one."""
    if requested == "auto":
        requested = os.environ.get("MEMFIT_IO_BACKEND", "auto")
    available = available_backends()
    if requested == "auto":
        return available[0]
    if requested not in BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r} (choose from auto, {', '.join(BACKENDS)})")
    if requested not in available:
        reason = "MEMFIT_NO_EXT=1 or no native extension" if native._C is None else "the kernel refuses io_uring"
        raise ValueError(f"backend: {requested!r} is not available here ({reason}); available: {available}")
    return requested


def check_geometry(block_size, queue_depth) -> tuple[int, int]:
    block_size = parse_size(block_size)
    if block_size <= 0 or block_size % ALIGNMENT or block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size: must be a multiple of 4096 between 4 KiB and 1 GiB, got {block_size}")
    if not isinstance(queue_depth, int) or not 1 <= queue_depth <= 4096:
        raise ValueError(f"queue_depth: must be an integer from 1 to 4096, got {queue_depth!r}")
    return block_size, queue_depth


def set_default_geometry(block_size, queue_depth: int) -> None:
    """Block size and queue depth of the files opened from now on without their own (the
    config's aio section: memfit.initialize sets it for the process)."""
    global _default_geometry
    _default_geometry = check_geometry(block_size, queue_depth)


def resolve_geometry(block_size=None, queue_depth: int | None = None) -> tuple[int, int]:
    """(block size, queue depth), checked; None takes the process default."""
    return check_geometry(
        _default_geometry[0] if block_size is None else block_size,
        _default_geometry[1] if queue_depth is None else queue_depth,
    )


def get_engine(requested: str = "auto", block_size=None, queue_depth: int | None = None):
    """The shared engine of a backend and geometry; None takes the process default."""
    name = backend(requested)
    block_size, queue_depth = resolve_geometry(block_size, queue_depth)
    key = (name, block_size, queue_depth)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            if name == "python":
                engine = PyEngine(block_size, queue_depth)
            else:
                engine = native._C.Engine(name, block_size, queue_depth)
            _engines[key] = engine
        return engine
