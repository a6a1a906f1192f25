"""Byte sizes and rates, read the way users write them and printed in one convention.

memfit reads and prints binary units only: a size suffix K, M, G, T (or KiB, KB, ...) is a power
of 1024, every size memfit prints is in B, KiB, MiB, GiB or TiB (format_bytes), and every rate in
GiB/s (bytes per second divided by GiB). Nothing in memfit's output uses decimal MB or GB.
"""

import operator
import re

_MULTIPLIERS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
GiB = 1 << 30


def parse_size(text: str | int, what: str = "size") -> int:
    """Parses a size with an optional binary suffix (K, M, G, T; KiB, MB, ... mean the same).
    what names the argument in error messages."""
    if isinstance(text, str):
        match = _SIZE_PATTERN.match(text)
        if match is None:
            raise ValueError(f"{what}: not a size: {text!r} (expected e.g. 4096, 1M, 8MiB, 1G)")
        number, suffix = match.groups()
        return int(float(number) * _MULTIPLIERS[suffix.upper()])
    if isinstance(text, bool):
        raise ValueError(f"{what}: not a size: {text!r}")
    try:
        num_bytes = operator.index(text)
    except TypeError:
        raise ValueError(f"{what}: not a size: {text!r} (expected an integer or a string like 1M)") from None
    if num_bytes < 0:
        raise ValueError(f"{what}: must not be negative, got {num_bytes}")
    return num_bytes


def format_bytes(num_bytes: float) -> str:
    """4096 -> '4.0 KiB'; whole bytes below 1 KiB."""
    for unit in _UNITS[:-1]:
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} {_UNITS[-1]}"
