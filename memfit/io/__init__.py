"""Asynchronous file I/O (io_uring, a thread pool, or pure Python), the swap file, and the host
arena: the storage layer the NVMe offload and the snapshot flush are built on.

Every class here may be used from several threads at once. Failures surface as OSError(errno,
path) and misuse as ValueError; nothing here aborts the process. Lifetimes: a request keeps its
buffer alive until it finishes and close() waits for every request; HostArena.close() refuses
while a tensor from the arena is alive; a SwapFile's file is removed when it is closed, collected
or the process exits, unless keep=True.
"""

from memfit.io.arena import HostArena
from memfit.io.engine import (
    BACKENDS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_QUEUE_DEPTH,
    RegisteredBuffer,
    available_backends,
    backend,
    register_buffer,
)
from memfit.io.file import AsyncFile, Request
from memfit.io.swap import SwapFile, SwapFullError

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_QUEUE_DEPTH",
    "AsyncFile",
    "HostArena",
    "RegisteredBuffer",
    "Request",
    "SwapFile",
    "SwapFullError",
    "available_backends",
    "backend",
    "register_buffer",
]
