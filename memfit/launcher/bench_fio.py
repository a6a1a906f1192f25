"""fio as `memfit bench io`'s yardstick: the job that matches memfit's transfer, and the reading of
fio's JSON report.

The job moves the same bytes of the same file as memfit does (same size, block size, queue depth,
O_DIRECT), one job, one file, sequentially. The caller runs it on a file memfit has already
written in full, so a read never meets unwritten extents (which ext4 answers with zeros without
touching the disk) and a write never allocates blocks.
"""

import json
import os
import shutil
import subprocess

FIO_ENGINES = ("io_uring", "libaio")


def fio_version() -> str | None:
    """fio's version string, or None when fio is not on PATH."""
    if shutil.which("fio") is None:
        return None
    result = subprocess.run(["fio", "--version"], capture_output=True, text=True)
    return result.stdout.strip() or "fio (unknown version)"


def check_fio_engines(text: str) -> list[str]:
    engines = [engine.strip() for engine in text.split(",") if engine.strip()]
    unknown = [engine for engine in engines if engine not in FIO_ENGINES]
    if not engines or unknown:
        raise ValueError(f"--fio-engine: expected one or more of {', '.join(FIO_ENGINES)}, got {text!r}")
    return engines


def fio_command(
    path: str, *, op: str, engine: str, size_bytes: int, block_size: int, queue_depth: int, direct: bool
) -> list[str]:
    """The fio job for one sequential pass of op ('read' or 'write') over the first size_bytes of path."""
    return [
        "fio",
        "--name=memfit-bench",
        f"--filename={path}",
        f"--rw={op}",
        f"--size={size_bytes}",
        f"--bs={block_size}",
        f"--ioengine={engine}",
        f"--iodepth={queue_depth}",
        f"--direct={int(direct)}",
        "--numjobs=1",
        "--output-format=json",
    ]


def parse_fio_json(text: str, op: str) -> tuple[int, float]:
    """(bytes moved, seconds) of the op ('read' or 'write') half of fio's --output-format=json
    report. fio may print warnings ahead of the JSON; they are skipped. ValueError says what is
    missing or names the error fio reported."""
    start = text.find("{")
    if start < 0:
        raise ValueError("fio printed no JSON report")
    try:
        report = json.loads(text[start:])
        job = report["jobs"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        raise ValueError(f"fio's JSON report is malformed ({type(error).__name__}: {error})") from None
    if job.get("error"):
        raise ValueError(f"fio's job failed with error {job['error']} ({os.strerror(job['error'])})")
    try:
        stats = job[op]
        num_bytes, runtime_ms = int(stats["io_bytes"]), float(stats["runtime"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"fio's JSON report has no {op} figures (io_bytes, runtime)") from None
    if num_bytes <= 0 or runtime_ms <= 0:
        raise ValueError(f"fio's JSON report shows no {op}: {num_bytes} bytes in {runtime_ms} ms")
    return num_bytes, runtime_ms / 1000


def run_fio(command: list[str], op: str, expected_bytes: int) -> float:
    """Runs one fio job and returns its seconds; ValueError with fio's own message if it fails or
    moves a different number of bytes than expected_bytes."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ValueError(f"fio {op} failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}")
    num_bytes, seconds = parse_fio_json(result.stdout, op)
    if num_bytes != expected_bytes:
        raise ValueError(f"fio {op} moved {num_bytes} bytes, expected {expected_bytes}")
    return seconds
