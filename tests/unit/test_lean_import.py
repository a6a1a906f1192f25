"""Importing memfit initializes no CUDA and compiles nothing."""

import subprocess
import sys
import textwrap


def test_import_initializes_no_cuda_and_builds_nothing():
    code = textwrap.dedent(
        """
        import sys, torch
        import torch.utils.cpp_extension as cpp_extension
        built = []
        cpp_extension.load = lambda *a, **k: built.append(a)
        import memfit, memfit.io
        print("cuda_initialized", torch.cuda.is_initialized())
        print("built", len(built))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cuda_initialized False" in result.stdout
    assert "built 0" in result.stdout


def test_no_ext_selects_python_backend():
    code = "import memfit.io as io; print(io.backend(), io.available_backends())"
    env_run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "MEMFIT_NO_EXT": "1"},
    )
    assert env_run.returncode == 0, env_run.stderr
    assert env_run.stdout.strip() == "python ['python']"
