"""Side-by-side timing of batchnorm against PyTorch's CPU batch norm, NumPy (and TensorFlow when
installed) on the cases of README "Performance", in one process with interleaved repetitions (the
machines are shared and noisy: ratios measured together hold, absolute times drift).

    pip install . torch==2.13.0 matplotlib   # torch and matplotlib only for this script
    python bench/compare.py --threads 2 --png compare.png

Each library gets its best layout: PyTorch sees channels-last data as an NCHW tensor in
channels_last memory format and (B, T, C) sequences as (B*T, C); batchnorm writes into
preallocated outputs (`out=`), the others allocate theirs, as their APIs do. The backward column
times PyTorch's native_batch_norm_backward (what autograd calls) given the saved statistics.
Peak memory is the growth of the resident set during one call, measured in a separate process per
case (the resident high-water mark of /proc/self/status, reset through /proc/self/clear_refs)
under a fixed malloc mmap threshold, so that freed buffers leave the resident set at once; the
timings run under the default allocator.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def _threads_argument() -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=2)
    return str(parser.parse_known_args()[0].threads)


# OpenMP reads its settings at start-up: fix them, then start over.
if __name__ == "__main__" and os.environ.get("OMP_NUM_THREADS") != _threads_argument():
    os.environ["OMP_NUM_THREADS"] = _threads_argument()
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np  # noqa: E402

import batchnorm  # noqa: E402

EPSILON = 1e-3
MOMENTUM = 0.99  # Keras convention; PyTorch's momentum is 1 - this

# (label, shape as given, layout): "nchw" features on axis 1, "nhwc" the same shape stored
# channels-last, "last" features on the last axis.
CASES = [
    ("(32,64,112,112) NCHW", (32, 64, 112, 112), "nchw"),
    ("(32,64,112,112) NHWC", (32, 64, 112, 112), "nhwc"),
    ("(64,256,28,28) NCHW", (64, 256, 28, 28), "nchw"),
    ("(64,256,28,28) NHWC", (64, 256, 28, 28), "nhwc"),
    ("(256,2048,7,7) NCHW", (256, 2048, 7, 7), "nchw"),
    ("(256,2048,7,7) NHWC", (256, 2048, 7, 7), "nhwc"),
    ("(65536,512)", (65536, 512), "last"),
    ("(64,128,1024)", (64, 128, 1024), "last"),
    ("(64,256) small", (64, 256), "last"),
]
MODES = ("train", "infer", "backward")


def stored_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "nhwc":
        return (shape[0], *shape[2:], shape[1])
    return shape


def feature_axis(layout: str) -> int:
    return 1 if layout == "nchw" else -1


# ---- the libraries: each returns {mode: zero-argument callable} for one case ---------------


def ours(x: np.ndarray, dy: np.ndarray, layout: str) -> dict[str, Callable[[], Any]]:
    layer = batchnorm.BatchNormalization(axis=feature_axis(layout), momentum=MOMENTUM)
    y, dx = np.empty_like(x), np.empty_like(x)
    layer(x, training=True, out=y)  # builds the weights; backward needs a training call

    def backward() -> None:
        layer.backward(dy, out=dx)

    calls = {
        "train": lambda: layer(x, training=True, out=y),
        "infer": lambda: layer(x, out=y),
        "backward": backward,
    }
    return calls


def torch_library(threads: int) -> Callable[..., dict[str, Callable[[], Any]]] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    functional = torch.nn.functional

    def as_torch(a: np.ndarray, layout: str) -> Any:
        t = torch.from_numpy(a)
        if layout == "nhwc":  # NCHW view in channels_last memory format: PyTorch's own layout
            return t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
        if layout == "last" and a.ndim > 2:  # (B, T, C) normalized over C is (B*T, C)
            return t.reshape(-1, a.shape[-1])
        return t

    def make(x: np.ndarray, dy: np.ndarray, layout: str) -> dict[str, Callable[[], Any]]:
        tx, tdy = as_torch(x, layout), as_torch(dy, layout)
        c = tx.shape[1]
        weight, bias = torch.ones(c), torch.zeros(c)
        mean, var = torch.zeros(c), torch.ones(c)
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            tx, weight, bias, mean, var, True, 1 - MOMENTUM, EPSILON
        )
        return {
            "train": lambda: functional.batch_norm(
                tx, mean, var, weight, bias, True, 1 - MOMENTUM, EPSILON
            ),
            "infer": lambda: functional.batch_norm(
                tx, mean, var, weight, bias, False, 1 - MOMENTUM, EPSILON
            ),
            "backward": lambda: torch.ops.aten.native_batch_norm_backward(
                tdy, tx, weight, mean, var, save_mean, save_invstd, True, EPSILON, [True] * 3
            ),
        }

    return make


def numpy_library(x: np.ndarray, dy: np.ndarray, layout: str) -> dict[str, Callable[[], Any]]:
    """What a NumPy user writes: reductions over the other axes, broadcasting arithmetic."""
    axis = feature_axis(layout) % x.ndim
    reduced = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    gamma, beta = np.ones(shape, x.dtype), np.zeros(shape, x.dtype)
    moving_mean, moving_var = np.zeros(shape, x.dtype), np.ones(shape, x.dtype)
    n = x.size // x.shape[axis]

    def train() -> np.ndarray:
        mean = x.mean(axis=reduced, keepdims=True)
        var = x.var(axis=reduced, keepdims=True)
        return (x - mean) * (gamma / np.sqrt(var + EPSILON)) + beta

    def backward() -> tuple[np.ndarray, ...]:
        mean = x.mean(axis=reduced, keepdims=True)
        inv = 1.0 / np.sqrt(x.var(axis=reduced, keepdims=True) + EPSILON)
        xhat = (x - mean) * inv
        dbeta = dy.sum(axis=reduced, keepdims=True)
        dgamma = (dy * xhat).sum(axis=reduced, keepdims=True)
        dx = (gamma * inv / n) * (n * dy - dbeta - xhat * dgamma)
        return dx, dgamma, dbeta

    return {
        "train": train,
        "infer": lambda: (x - moving_mean) * (gamma / np.sqrt(moving_var + EPSILON)) + beta,
        "backward": backward,
    }


def tensorflow_library() -> Callable[..., dict[str, Callable[[], Any]]] | None:
    try:
        import tensorflow as tf
    except ImportError:
        return None

    def make(x: np.ndarray, dy: np.ndarray, layout: str) -> dict[str, Callable[[], Any]]:
        tx, tdy = tf.constant(x), tf.constant(dy)
        layer = tf.keras.layers.BatchNormalization(
            axis=feature_axis(layout), momentum=MOMENTUM, epsilon=EPSILON
        )
        layer(tx, training=True)

        @tf.function
        def train() -> Any:
            return layer(tx, training=True)

        @tf.function
        def infer() -> Any:
            return layer(tx, training=False)

        # TensorFlow computes gradients on a tape: its backward includes the forward.
        @tf.function
        def backward() -> Any:
            with tf.GradientTape() as tape:
                tape.watch(tx)
                y = layer(tx, training=True)
            return tape.gradient(y, [tx, *layer.trainable_variables], output_gradients=tdy)

        return {"train": train, "infer": infer, "backward": backward}

    return make


# ---- measurement -------------------------------------------------------------------------


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_growth_mib(call: Callable[[], Any]) -> float | None:
    """Growth of the resident set during one call (its temporaries and new outputs)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return None
    before = resident_kib("VmRSS:")
    result = call()
    peak = resident_kib("VmHWM:")
    del result
    return max(peak - before, 0) / 1024  # a call that frees more than it keeps grows nothing


def memory_child(args: argparse.Namespace, libraries: dict[str, Any], modes: list[str]) -> None:
    """Prints {library: {mode: peak MiB}} for the one case --memory-of names, as JSON."""
    label, shape, layout = CASES[args.memory_of]
    x, dy = case_data(shape, layout)
    result: dict[str, dict[str, float | None]] = {}
    for name, make in libraries.items():
        calls = make(x, dy, layout)
        for call in calls.values():  # outputs, thread pools and caches exist before measuring
            call()
        result[name] = {mode: peak_growth_mib(calls[mode]) for mode in modes}
        del calls
    print(json.dumps(result))


def peaks_of(case: int, argv: list[str]) -> dict[str, dict[str, float | None]]:
    """Runs the memory measurement of one case in a child process with a fixed mmap threshold
    (glibc then returns every large freed block at once, instead of keeping it resident)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-of", str(case)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def case_data(shape: tuple[int, ...], layout: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(stored_shape(shape, layout), dtype=np.float32) * 2.0 + 0.5
    return x, rng.standard_normal(x.shape, dtype=np.float32)


def interleaved(calls: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Times every library's call once per round, rotating the order from round to round."""
    names = list(calls)
    for name in names:  # warm-up: first-touch of outputs, thread pools, tracing
        calls[name]()
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for every library")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds per case")
    parser.add_argument("--modes", default=",".join(MODES), help="train,infer,backward")
    parser.add_argument("--cases", default="", help="substring filter on the case labels")
    parser.add_argument("--png", default="compare.png", help="bar chart ('' for none)")
    parser.add_argument("--csv", default="", help="also write the table as CSV")
    parser.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--libraries",
        default="torch,tensorflow,numpy",
        help="the libraries to compare with, among those installed (batchnorm always runs)",
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")

    wanted = set(args.libraries.split(","))
    libraries: dict[str, Callable[..., dict[str, Callable[[], Any]]]] = {"batchnorm": ours}
    if "torch" in wanted and (torch_make := torch_library(args.threads)):
        libraries["torch"] = torch_make
    if "tensorflow" in wanted and (tf_make := tensorflow_library()):
        libraries["tensorflow"] = tf_make
    if "numpy" in wanted:
        libraries["numpy"] = numpy_library
    others = [name for name in libraries if name != "batchnorm"]
    if args.memory_of is not None:
        memory_child(args, libraries, modes)
        return

    print(
        f"{len(libraries)} libraries ({', '.join(libraries)}), {args.threads} threads,"
        f" {args.reps} interleaved rounds; median ms, ratio = other / batchnorm,"
        " peak = resident growth during a call (MiB)"
    )
    header = f"{'case':24} {'mode':8} {'batchnorm':>10} {'peak':>6}"
    for name in others:
        header += f" {name:>10} {'ratio':>6} {'peak':>6}"
    print(header)

    rows = []
    child_argv = ["--threads", str(args.threads), "--modes", args.modes]
    child_argv += ["--libraries", args.libraries]
    for index, (label, shape, layout) in enumerate(CASES):
        if args.cases and args.cases not in label:
            continue
        x, dy = case_data(shape, layout)
        per_library = {name: make(x, dy, layout) for name, make in libraries.items()}
        memory = {} if args.no_memory else peaks_of(index, child_argv)
        for mode in modes:
            calls = {name: per_library[name][mode] for name in libraries}
            times = interleaved(calls, args.reps)
            medians = {name: statistics.median(t) for name, t in times.items()}
            peaks = {name: memory.get(name, {}).get(mode) for name in libraries}
            row = {
                "case": label,
                "mode": mode,
                "input_mib": x.nbytes / 2**20,
                **{f"{name}_ms": medians[name] * 1e3 for name in libraries},
                **{f"{name}_peak_mib": peaks[name] for name in libraries},
                **{f"{name}_ratio": medians[name] / medians["batchnorm"] for name in others},
            }
            rows.append(row)
            line = f"{label:24} {mode:8} {row['batchnorm_ms']:10.3f} {_mib(peaks['batchnorm'])}"
            for name in others:
                line += (
                    f" {row[f'{name}_ms']:10.3f} {row[f'{name}_ratio']:5.1f}x {_mib(peaks[name])}"
                )
            print(line, flush=True)
        del per_library, calls

    if args.csv:
        with open(args.csv, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.png:
        chart(rows, others, args.png, args.threads)


def _mib(value: float | None) -> str:
    return f"{'n/a':>6}" if value is None else f"{value:6.1f}"


def chart(rows: list[dict[str, Any]], others: list[str], path: str, threads: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart written")
        return
    labels = [f"{r['case']}\n{r['mode']}" for r in rows]
    positions = np.arange(len(rows))
    width = 0.8 / max(len(others), 1)
    fig, axes = plt.subplots(figsize=(max(10, 0.55 * len(rows)), 5))
    for i, name in enumerate(others):
        ratios = [r[f"{name}_ratio"] for r in rows]
        axes.bar(positions + (i - (len(others) - 1) / 2) * width, ratios, width, label=name)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_ylabel("time relative to batchnorm (higher: batchnorm faster)")
    axes.set_title(f"float32, {threads} threads, median of interleaved rounds")
    axes.set_xticks(positions, labels, rotation=90, fontsize=7)
    axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
