"""The process's peak resident memory, for memory_report and the monitors, and the return of
freed heap pages to the system."""

import ctypes
import ctypes.util

import psutil

_libc = None
TRIM_FROM_BYTES = 1 << 20  # freeing less than this leaves the heap as it is


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM), or its current RSS where /proc lacks it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def return_freed_pages(freed_bytes: int) -> None:
    """After a large tensor was freed, gives the free pages of the heap back to the system
    (glibc's malloc_trim; elsewhere nothing). A build that allocates and frees tensor after tensor
    (memfit.zero_init) needs it: small long-lived allocations land in the freed chunks, so glibc
    cannot reuse them whole for the next tensor nor unmap them, and resident memory would grow
    by every tensor built."""
    global _libc
    if freed_bytes < TRIM_FROM_BYTES:
        return
    if _libc is None:
        name = ctypes.util.find_library("c")
        library = ctypes.CDLL(name) if name else None
        _libc = library if library is not None and hasattr(library, "malloc_trim") else False
    if _libc:
        _libc.malloc_trim(0)
