"""Backend selection and the shared engines. Engines are shared per (backend, block size, queue
depth), so many files and many requests in flight share one ring or one worker pool.

Registered buffers (register_buffer) are memory pinned once with every io_uring engine of the
process, those open now and those opened later; a transfer that lies inside one is sent as a fixed
read or write, which spares the kernel pinning its pages and, for a read, dirtying them on every
transfer. A registration holds its buffer alive and its pages resident until close().

Engines belong to the process that created them: a child of fork() has none of their threads, so
it forgets them and creates its own on first use (see AsyncFile for files opened before a fork);
it forgets the parent's registrations too.
"""

import errno
import os
import threading
import warnings

from memfit.io import native
from memfit.io.buffers import buffer_span
from memfit.io.pyengine import ALIGNMENT, PyEngine
from memfit.units import parse_size

DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_QUEUE_DEPTH = 32
MAX_BLOCK_SIZE = 1 << 30
BACKENDS = ("io_uring", "threads", "python")
MAX_FIXED_ENTRY_BYTES = 1 << 30  # the kernel's limit on one registered buffer

_engines: dict = {}
_engines_lock = threading.Lock()
_default_geometry = (DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH)
_registrations: list = []  # the open RegisteredBuffers, applied to every new io_uring engine


def _forget_engines_after_fork() -> None:
    global _engines_lock
    _engines_lock = threading.Lock()  # another thread may have held it at the fork
    _engines.clear()
    _registrations.clear()


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
            for registration in _registrations:
                registration._register_with(engine)
        return engine


class RegisteredBuffer:
    """A buffer registered with every io_uring engine (see the module docstring). close() releases
    it; call it only once no request in flight uses the buffer. Where registration is refused (no
    io_uring, a kernel before 5.19, RLIMIT_MEMLOCK too low) transfers go out as plain reads and
    writes, with one RuntimeWarning saying why."""

    def __init__(self, buffer):
        span = buffer_span(buffer, writable=False)
        self.address, self.num_bytes = span.address, span.num_bytes
        self._owner = span.owner  # the memory must stay mapped while the kernel holds its pages
        self._owner_pid = os.getpid()
        self._entries: list[tuple[object, int]] = []  # (engine, entry) per registered part
        self._warned = False
        with _engines_lock:
            for engine in _engines.values():
                self._register_with(engine)
            _registrations.append(self)

    @property
    def num_fixed_entries(self) -> int:
        """Parts of the buffer registered, over all engines (0: every transfer is a plain one)."""
        return len(self._entries)

    def _register_with(self, engine) -> None:
        if getattr(engine, "backend", None) != "io_uring" or not hasattr(engine, "register_buffer"):
            return
        for start in range(0, self.num_bytes, MAX_FIXED_ENTRY_BYTES):
            num_bytes = min(MAX_FIXED_ENTRY_BYTES, self.num_bytes - start)
            entry = engine.register_buffer(self.address + start, num_bytes)
            if entry < 0:
                self._warn(-entry)
                return
            self._entries.append((engine, entry))

    def _warn(self, code: int) -> None:
        if self._warned:
            return
        self._warned = True
        hint = " (raise RLIMIT_MEMLOCK, ulimit -l)" if code == errno.ENOMEM else ""
        warnings.warn(
            f"register_buffer: io_uring refused to register {self.num_bytes} bytes: {os.strerror(code)}{hint}; "
            "transfers into that memory are not fixed",
            RuntimeWarning,
            stacklevel=4,
        )

    def close(self) -> None:
        """Unregisters the buffer from every engine; safe to call twice."""
        if os.getpid() != self._owner_pid:
            return  # the entries belong to the parent's rings
        with _engines_lock:
            if self in _registrations:
                _registrations.remove(self)
            entries, self._entries = self._entries, []
        for engine, entry in entries:
            engine.unregister_buffer(entry)
        self._owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def register_buffer(buffer) -> RegisteredBuffer:
    """Registers buffer (a CPU tensor or any buffer-protocol object, such as a HostArena block)
    with every io_uring engine, now and later, until the returned handle is closed."""
    return RegisteredBuffer(buffer)
