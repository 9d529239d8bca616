"""`python -m batchnorm --cmake-dir | --include-dir`: where the installed wheel keeps its C++
package (headers, shared library, batchnormConfig.cmake), for C++ projects to build against it,
as `python -m nanobind --cmake_dir` does:

    cmake -S . -B build -Dbatchnorm_DIR="$(python -m batchnorm --cmake-dir)"
"""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchnorm",
        description="Locations of the C++ package shipped inside the batchnorm wheel.",
    )
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--cmake-dir", action="store_true", help="print the directory of batchnormConfig.cmake"
    )
    choice.add_argument(
        "--include-dir", action="store_true", help="print the directory of the C++ headers"
    )
    args = parser.parse_args(argv)
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
