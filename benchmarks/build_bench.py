"""Build time of memfit's native extension from a clean tree, and optionally of DeepSpeed's
async I/O op (JIT-compiled at first use), on the same machine in the same run.

    python benchmarks/build_bench.py [--deepspeed]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import command_line, deepspeed_version, machine_description, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memfit_build_seconds() -> float:
    with tempfile.TemporaryDirectory() as workdir:
        source = os.path.join(workdir, "src")
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.so", "*.egg-info", "runs"))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=source, check=True, capture_output=True
        )
        return time.perf_counter() - started


def deepspeed_build_seconds() -> float:
    code = (
        "import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu');"
        "from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load(verbose=False)"
    )
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            env={**os.environ, "TORCH_EXTENSIONS_DIR": cache},
        )
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed", action="store_true", help="also time DeepSpeed's async_io JIT build")
    args = parser.parse_args()
    rows = [
        "| what | seconds |",
        "| --- | ---: |",
        f"| memfit._C (setup.py build_ext, clean tree) | {memfit_build_seconds():.1f} |",
    ]
    if args.deepspeed:
        rows.append(f"| DeepSpeed async_io op (first load, empty extension cache) | {deepspeed_build_seconds():.1f} |")
    body = "\n".join(
        [f"Command: `{command_line()}`", "", machine_description(), f"- deepspeed: {deepspeed_version()}", "", *rows]
    )
    print(body)
    print("written to", write_section("Build time (benchmarks/build_bench.py)", body))


if __name__ == "__main__":
    main()
