"""Builds memfit._C from csrc/ with pybind11: plain C++17, no torch headers, no system libraries."""

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

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
        )
    ]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
