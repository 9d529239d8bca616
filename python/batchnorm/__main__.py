"""`python -m batchnorm`: what this installation has — version, the CPU instruction set the kernels
picked, OpenMP threads, the CUDA backend and devices, the optional framework modules — and where
the wheel keeps its C++ package (headers, shared library, batchnormConfig.cmake), for C++ projects
to build against it, as `python -m nanobind --cmake_dir` does:

    python -m batchnorm                 # the report
    python -m batchnorm --version
    cmake -S . -B build -Dbatchnorm_DIR="$(python -m batchnorm --cmake-dir)"
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def cmake_dir() -> Path:
    """The directory holding batchnormConfig.cmake (give it to CMake as `batchnorm_DIR`)."""
    return _PACKAGE / "lib" / "cmake" / "batchnorm"


def include_dir() -> Path:
    """The directory to add to the include path for `#include <batchnorm/batchnorm.hpp>`."""
    return _PACKAGE / "include"


def report() -> str:
    """The installation report `python -m batchnorm` prints."""
    from . import __version__, _core

    info = _core.runtime_info()
    threads = os.environ.get("OMP_NUM_THREADS")
    if not info["cuda_built"]:
        cuda = "not in this build (rebuild with nvcc present, or BATCHNORM_ENABLE_CUDA=ON)"
    elif info["cuda_devices"]:
        cuda = f"built; {info['cuda_devices']} device(s) visible"
    else:
        cuda = "built; no usable device (no GPU or driver visible)"
    frameworks = ", ".join(
        f"{name} ({'installed' if importlib.util.find_spec(name) else 'not installed'})"
        for name in ("torch", "jax", "cupy", "mpi4py", "h5py")
    )
    cpp = cmake_dir() if cmake_dir().is_dir() else "not shipped (not installed from the wheel)"
    lines = [
        f"batchnorm {__version__}",
        f"  package:          {_PACKAGE}",
        f"  CPU kernels:      {info['cpu_instruction_set']} (chosen at run time; "
        "BATCHNORM_CPU_ISA=baseline|avx2 lowers it)",
        f"  OpenMP threads:   {info['cpu_threads']} per call "
        f"(OMP_NUM_THREADS={threads if threads is not None else 'unset'})",
        f"  CUDA backend:     {cuda}",
        f"  frameworks:       {frameworks}",
        f"  C++ package:      {cpp}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchnorm",
        description="Reports what this batchnorm installation has (with no option), or prints "
        "where the wheel keeps its C++ package.",
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--version", action="store_true", help="print the version")
    choice.add_argument(
        "--cmake-dir", action="store_true", help="print the directory of batchnormConfig.cmake"
    )
    choice.add_argument(
        "--include-dir", action="store_true", help="print the directory of the C++ headers"
    )
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not (args.cmake_dir or args.include_dir):
        print(report())
        return 0
    path = cmake_dir() if args.cmake_dir else include_dir()
    if not path.is_dir():
        print(
            f"batchnorm: {path} does not exist: this copy of batchnorm was not installed from "
            "its wheel (`pip install .` ships the C++ package)",
            file=sys.stderr,
        )
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
