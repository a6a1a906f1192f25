"""Shared by the benchmark scripts: machine description, medians, and the results file."""

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"]
    return " ".join(flag for flag in wanted if flag in flags)


def machine_name() -> str:
    """A short stable name for the results file: cores and CPU family, e.g. 2core-amd-epyc."""
    model = cpu_model().lower()
    family = "amd-epyc" if "epyc" in model else re.sub(r"[^a-z0-9]+", "-", model)[:24].strip("-")
    return f"{os.cpu_count()}core-{family}"


def machine_description(path_for_disk: str | None = None) -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores, flags: {cpu_flags()}",
        f"- RAM: {mem_gib:.1f} GiB",
        f"- Python {platform.python_version()}, torch {torch.__version__}, kernel {platform.release()}",
        "- Load average when written (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    ]
    if path_for_disk:
        fs = subprocess.run(["df", "-T", path_for_disk], capture_output=True, text=True).stdout.splitlines()[-1].split()
        lines.append(f"- Disk: {fs[0]} ({fs[1]}) holding {path_for_disk}")
    return "\n".join(lines)


def median(values) -> float:
    return statistics.median(values)


def write_section(title: str, body: str) -> str:
    """Replaces (or appends) the section called title in this machine's results file for this month."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{machine_name()}_{datetime.date.today():%Y-%m}.md")
    text = open(path).read() if os.path.exists(path) else f"# Benchmark results: {machine_name()}\n"
    header = f"\n## {title}\n"
    section = f"{header}\n{body.strip()}\n"
    start = text.find(header)
    if start >= 0:
        end = text.find("\n## ", start + len(header))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n" + section
    with open(path, "w") as f:
        f.write(text)
    return path


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def deepspeed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:
        return "not installed"
