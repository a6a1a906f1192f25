"""The process's peak resident memory, for memory_report and the monitors."""

import psutil


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
