"""`memfit report` shows what memfit finds on this machine, checked here against independent
readings of the same facts; and an install without a C++ compiler succeeds on the pure-Python
engine, which the report then names with the reason."""

import os
import platform
import resource
import shutil
import subprocess
import sys
import venv

import pytest
import torch

import memfit
from memfit.io import available_backends, backend
from memfit.optim.fused_adam import adam_isa, available_adam_isas
from memfit.units import format_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_FEATURES = {
    "AVX2": "avx2",
    "FMA": "fma",
    "AVX-512F": "avx512f",
    "AVX512-BF16": "avx512_bf16",
    "AMX-BF16": "amx_bf16",
}
MISSING_COMPILER = {"CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"}


def environment_without_a_compiler(base=None) -> dict:
    """The environment of a user's machine without a compiler: CI's MEMFIT_REQUIRE_EXT=1 (a failed
    native build fails the run) is not the user's default."""
    base = os.environ if base is None else base
    return {**{k: v for k, v in base.items() if k != "MEMFIT_REQUIRE_EXT"}, **MISSING_COMPILER}


# This machine may hold an editable install of another memfit checkout; its import hook answers for
# memfit._C whenever the memfit under test has none. A tree built without the extension is reported
# with such hooks removed, as it would be on a machine where it is the only memfit.
ONLY_THIS_MEMFIT = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]; "
    "runpy.run_module('memfit.launcher.cli', run_name='__main__')"
)


def report(cwd, python=sys.executable, only_this_memfit=False, **env) -> dict[str, str]:
    """The report as {name: value}, from its `name ..... value` lines."""
    entry = ["-c", ONLY_THIS_MEMFIT] if only_this_memfit else ["-m", "memfit.launcher.cli"]
    result = subprocess.run(
        [python, *entry, "report"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    fields = {}
    for line in result.stdout.splitlines():
        name, dots, value = line.partition(" ..")
        if dots:
            fields[name] = value.lstrip(". ")
    return fields


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_report_names_versions_paths_and_machine_limits(tmp_path):
    fields = report(tmp_path)
    assert fields["memfit"] == f"{memfit.__version__} at {os.path.dirname(memfit.__file__)}"
    assert fields["python"] == f"{platform.python_version()} at {sys.executable}"
    build = "CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
    assert fields["torch"] == f"{torch.__version__}, {build}, at {os.path.dirname(torch.__file__)}"
    if not torch.cuda.is_available():
        assert fields["CUDA devices"] == "none"
    assert fields["native extension"].startswith("built: ")
    assert fields["I/O backends"] == f"{', '.join(available_backends())}; auto picks {backend()}"
    assert fields["io_uring"] == ("available" if "io_uring" in available_backends() else fields["io_uring"])
    flags = cpu_flags()
    assert fields["CPU vector features"] == ", ".join(
        f"{name} {'yes' if flag in flags else 'no'}" for name, flag in CPU_FEATURES.items()
    )
    shm = os.statvfs("/dev/shm")
    assert fields["/dev/shm"] == (
        f"{format_bytes(shm.f_frsize * shm.f_blocks)}, {format_bytes(shm.f_frsize * shm.f_bavail)} free"
    )
    assert fields["Adam kernel ISA"] == f"{adam_isa()} (available: {', '.join(available_adam_isas())})"
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert (
        fields["RLIMIT_MEMLOCK"]
        == " / ".join("unlimited" if limit == resource.RLIM_INFINITY else format_bytes(limit) for limit in (soft, hard))
        + " (soft / hard)"
    )


def test_report_with_the_extension_disabled(tmp_path):
    fields = report(tmp_path, MEMFIT_NO_EXT="1")
    assert fields["native extension"] == "disabled by MEMFIT_NO_EXT=1; memfit runs on its pure-Python fallbacks"
    assert fields["I/O backends"] == "python; auto picks python"
    assert fields["io_uring"] == "not used without the native extension"
    assert fields["Adam kernel ISA"] == "torch (available: torch)"


def test_report_shows_a_forced_adam_kernel_level(tmp_path):
    assert report(tmp_path, MEMFIT_ADAM_ISA="scalar")["Adam kernel ISA"].startswith("scalar (available: torch, scalar")
    assert report(tmp_path, MEMFIT_ADAM_ISA="sse9")["Adam kernel ISA"] == (
        "unknown (MEMFIT_ADAM_ISA: unknown level 'sse9'; choose from auto, torch, scalar, avx2, avx512)"
    )


def copy_source_tree(destination) -> str:
    """The files an install reads, without any built extension."""
    os.makedirs(destination)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), destination)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(destination, "csrc"))
    shutil.copytree(
        os.path.join(ROOT, "memfit"),
        os.path.join(destination, "memfit"),
        ignore=shutil.ignore_patterns("*.so", "__pycache__", "_native_build.txt"),
    )
    return str(destination)


def test_building_without_a_compiler_warns_and_the_report_says_why(tmp_path):
    source = copy_source_tree(tmp_path / "src")
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=source,
        env=environment_without_a_compiler(),
    )
    assert build.returncode == 0, build.stderr
    assert "memfit: could not build memfit._C" in build.stderr + build.stdout
    assert not [name for name in os.listdir(os.path.join(source, "memfit")) if name.startswith("_C")]
    fields = report(tmp_path, only_this_memfit=True, PYTHONPATH=source)
    assert fields["native extension"].startswith("not built at install: no working C++17 compiler (")
    assert fields["native extension"].endswith("); memfit runs on its pure-Python fallbacks")
    assert fields["I/O backends"] == "python; auto picks python"


def test_a_failed_build_is_an_error_when_the_extension_is_required(tmp_path):
    source = copy_source_tree(tmp_path / "src")
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=source,
        env={**environment_without_a_compiler(), "MEMFIT_REQUIRE_EXT": "1"},
    )
    assert build.returncode != 0


@pytest.mark.slow
def test_pip_install_without_a_compiler_installs_the_pure_python_engine(tmp_path):
    """A real `pip install` into a fresh virtual environment, which borrows this environment's torch,
    pip and build tools, so that nothing is downloaded."""
    source = copy_source_tree(tmp_path / "src")
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = str(tmp_path / "venv" / "bin" / "python")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", source],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=environment_without_a_compiler(env),
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    fields = report(tmp_path, python=python, only_this_memfit=True, PYTHONPATH="")
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    assert fields["memfit"] == f"{memfit.__version__} at {os.path.join(site_packages, 'memfit')}"
    assert fields["native extension"].startswith("not built at install: no working C++17 compiler (")
    assert fields["I/O backends"] == "python; auto picks python"
