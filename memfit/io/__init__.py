"""Asynchronous file I/O (io_uring, a thread pool, or pure Python), the swap file, and the host
arena: the storage layer the NVMe offload and the snapshot flush are built on."""

from memfit.io.arena import HostArena
from memfit.io.engine import BACKENDS, DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, available_backends, backend
from memfit.io.file import AsyncFile, Request
from memfit.io.swap import SwapFile, SwapFullError

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_QUEUE_DEPTH",
    "AsyncFile",
    "HostArena",
    "Request",
    "SwapFile",
    "SwapFullError",
    "available_backends",
    "backend",
]
