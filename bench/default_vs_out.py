"""What a call costs as users make it: batchnorm's default call (a new result each call) against
the same call into preallocated `out=` arrays, in a steady loop, for NumPy and torch inputs.

    python bench/default_vs_out.py --rounds 9

Three variants alternate within every round: "framework" (each result from `np.empty_like` /
`torch.empty_like`, as before the buffer cache), "cache" (the default call) and "out=". A round
times `--calls` calls in a row, each result kept until the next replaces it, as in a loop
`y = layer(x)`. Prints a Markdown table of median ms per call."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

import batchnorm
from batchnorm import _arrays

CASES = [((64, 28, 28, 256), -1), ((64, 256, 28, 28), 1), ((65536, 512), -1)]
CASES.append(((256, 7, 7, 2048), -1))
NEVER = 1 << 62  # a cache threshold no result reaches: every result from its framework


def loop_seconds(call: Callable[[], Any], calls: int) -> float:
    """Seconds per call over `calls` calls, each result kept until the next one replaces it."""
    kept = None
    start = time.perf_counter()
    for _ in range(calls):
        kept = call()
    elapsed = time.perf_counter() - start
    del kept
    return elapsed / calls


def mode_calls(
    x: Any, dy: Any, axis: int, y_out: Any, dx_out: Any
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """{mode: (default call, call into out=)} on one layer."""
    layer = batchnorm.BatchNormalization(axis=axis)
    layer(x, training=True)  # builds the weights
    # Inference first: backward then differentiates the training calls before it.
    return {
        "infer": (lambda: layer(x), lambda: layer(x, out=y_out)),
        "train": (lambda: layer(x, training=True), lambda: layer(x, training=True, out=y_out)),
        "backward": (lambda: layer.backward(dy), lambda: layer.backward(dy, out=dx_out)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch's threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threshold = _arrays.CACHED_BYTES
    rng = np.random.default_rng(0)
    print("| shape | arrays | mode | framework | cache | out= | framework / out= | cache / out= |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for shape, axis in CASES:
        x_numpy = rng.standard_normal(shape, dtype=np.float32)
        dy_numpy = rng.standard_normal(shape, dtype=np.float32)
        for library in ("numpy", "torch"):
            x, dy = x_numpy, dy_numpy
            if library == "torch":
                x, dy = torch.from_numpy(x_numpy), torch.from_numpy(dy_numpy)
            y_out, dx_out = x_numpy.copy(), x_numpy.copy()
            if library == "torch":
                y_out, dx_out = torch.from_numpy(y_out), torch.from_numpy(dx_out)
            modes = mode_calls(x, dy, axis, y_out, dx_out)
            for mode, (default, into) in modes.items():
                variants = {
                    "framework": (default, NEVER),
                    "cache": (default, threshold),
                    "out": (into, threshold),
                }
                times: dict[str, list[float]] = {name: [] for name in variants}
                for round_ in range(args.rounds + 1):  # round 0 warms every variant up
                    for name, (call, cached_from) in variants.items():
                        _arrays.CACHED_BYTES = cached_from
                        seconds = loop_seconds(call, args.calls)
                        if round_:
                            times[name].append(seconds)
                _arrays.CACHED_BYTES = threshold
                ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                print(
                    f"| {shape} | {library} | {mode} | {ms['framework']:.2f} | {ms['cache']:.2f}"
                    f" | {ms['out']:.2f} | {ms['framework'] / ms['out']:.2f}x"
                    f" | {ms['cache'] / ms['out']:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
