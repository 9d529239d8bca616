#!/usr/bin/env python3
"""`batchnorm-bench`: runs the benchmark program that `pip install .` keeps inside the batchnorm
package (batchnorm/bin/), next to the shared library it links; the arguments pass through."""

import importlib.util
import os
import sys


def main() -> None:
    spec = importlib.util.find_spec("batchnorm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("batchnorm-bench: the batchnorm package is not installed")
    program = os.path.join(spec.submodule_search_locations[0], "bin", "batchnorm-bench")
    os.execv(program, [program, *sys.argv[1:]])


if __name__ == "__main__":
    main()
