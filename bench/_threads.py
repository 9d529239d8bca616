"""The benchmark scripts' start-up: OpenMP reads OMP_NUM_THREADS once, when a process starts, so a
script run with a --threads other than the variable's starts itself over with the variable set
(the same for XLA's CPU pool and PyTorch's, which read it too)."""

from __future__ import annotations

import argparse
import os
import sys


def restart_with_threads(default: int = 2) -> None:
    """Re-executes the running script with OMP_NUM_THREADS = its --threads (default `default`)
    unless the variable says so already."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=default)
    threads = str(parser.parse_known_args()[0].threads)
    if os.environ.get("OMP_NUM_THREADS") != threads:
        os.environ["OMP_NUM_THREADS"] = threads
        os.execv(sys.executable, [sys.executable, *sys.argv])
