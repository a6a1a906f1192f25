"""Builds memfit._C from csrc/ with pybind11: plain C++17, no torch headers, no system libraries.

The extension is optional. Without a working C++17 compiler the install still succeeds: the build
warns, writes the reason to memfit/_native_build.txt (which `memfit report` shows), and memfit runs
on its pure-Python fallbacks, as with MEMFIT_NO_EXT=1. MEMFIT_REQUIRE_EXT=1 makes a failed build an
error instead (CI and development builds, where a broken build must not go unnoticed)."""

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import CCompilerError, ExecError, PlatformError

BUILD_STATUS_FILE = "_native_build.txt"
REQUIRED = os.environ.get("MEMFIT_REQUIRE_EXT") == "1"


class OptionalBuildExt(build_ext):
    """build_ext that records why the extension could not be built instead of failing the install.
    (setuptools' own `optional` extensions cover compiler errors, but not a compiler that is
    missing altogether, which reaches here as OSError.)"""

    def build_extension(self, ext) -> None:
        status_path = os.path.join(self.build_lib, "memfit", BUILD_STATUS_FILE)
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as error:
            if REQUIRED:
                raise
            reason = " ".join(str(error).split())
            self.warn(
                f"memfit: could not build {ext.name} ({reason}); installing without it: memfit will run on its "
                "pure-Python fallbacks (slower file I/O). Install a C++17 compiler and reinstall to build it."
            )
            os.makedirs(os.path.dirname(status_path), exist_ok=True)
            with open(status_path, "w") as f:
                f.write(f"no working C++17 compiler ({reason})\n")
        else:
            if os.path.exists(status_path):
                os.remove(status_path)

    def copy_extensions_to_source(self) -> None:
        """--inplace (and editable installs): the status travels with the extension."""
        super().copy_extensions_to_source()
        built = os.path.join(self.build_lib, "memfit", BUILD_STATUS_FILE)
        in_source = os.path.join(self.get_finalized_command("build_py").get_package_dir("memfit"), BUILD_STATUS_FILE)
        if os.path.exists(built):
            self.copy_file(built, in_source, level=self.verbose)
        elif os.path.exists(in_source):
            os.remove(in_source)


if os.environ.get("MEMFIT_NO_EXT") == "1":
    ext_modules = []
else:
    ext_modules = [
        Pybind11Extension(
            "memfit._C",
            sorted(glob.glob("csrc/**/*.cpp", recursive=True)),
            include_dirs=["csrc"],
            cxx_std=17,
            # No -march: csrc/adam picks its SIMD level at run time. No contraction of a * b + c into
            # an FMA: the Adam kernel places its FMAs by hand so every level computes the same bits.
            extra_compile_args=["-O3", "-Wall", "-Wextra", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=not REQUIRED,
        )
    ]

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
