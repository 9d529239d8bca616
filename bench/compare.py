"""Side-by-side timing of batchnorm against PyTorch's batch norm, NumPy (and TensorFlow when
installed) on the cases of docs/performance.md, in one process with interleaved repetitions (the
machines are shared and noisy: ratios measured together hold, absolute times drift).

    pip install . torch==2.13.0 matplotlib   # torch and matplotlib only for this script
    python bench/compare.py --threads 2 --png compare.png
    python bench/compare.py --device cuda --png compare-cuda.png   # CUDA builds of both

Each library gets its best layout: PyTorch sees channels-last data as an NCHW tensor in
channels_last memory format and (B, T, C) sequences as (B*T, C). Every library allocates its
outputs, as users call it ("batchnorm"); batchnorm writing into preallocated outputs (`out=`) is
timed in the same rounds beside it ("out=", batchnorm_out in the CSV). The PyTorch backward
column is what a PyTorch user runs: torch.autograd.grad through functional.batch_norm (the
autograd engine, then native_batch_norm_backward on the CPU or cuDNN's backward on CUDA) on a graph
built once. A call shorter than a millisecond is repeated within its round and timed as the mean
of the repeats, so that small cases measure the calls rather than the timer.
Peak memory is the growth of the resident set during one call, measured in a separate process per
case (the resident high-water mark of /proc/self/status, reset through /proc/self/clear_refs)
under a fixed malloc mmap threshold, so that freed buffers leave the resident set at once; the
timings run under the default allocator.

--device cuda runs batchnorm and PyTorch (cuDNN) on the same torch tensors on CUDA device 0, with
the batch of every case ×4 (--batch-scale): a GPU needs more data than a CPU to reach its
bandwidth. Each call is timed with CUDA events on an idle device. A device-to-device copy of the
input (dst.copy_(src)) runs in the same rounds as the bandwidth probe: batchnorm's GB/s under the
byte model (the passes over the data a call needs at least: training forward 3, inference 2,
backward 5; the copy 2) are given as % of it. Peak memory is the growth of
torch.cuda.max_memory_allocated during a call; batchnorm's per-call scratch (a few values per
channel) comes from its own CUDA memory pool and is not counted there. NumPy and TensorFlow
are not run on CUDA.
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
from collections import Counter
from functools import partial
from typing import Any, Callable

if __name__ == "__main__":  # OpenMP reads its settings at start-up: fix them first
    from _threads import restart_with_threads

    restart_with_threads()

import numpy as np  # noqa: E402

import batchnorm  # noqa: E402

EPSILON = 1e-3
MOMENTUM = 0.99  # Keras convention; PyTorch's momentum is 1 - this

# (shape as given, layout, label suffix): "nchw" features on axis 1, "nhwc" the same shape stored
# channels-last, "last" features on the last axis.
CASES = [
    ((32, 64, 112, 112), "nchw", "NCHW"),
    ((32, 64, 112, 112), "nhwc", "NHWC"),
    ((64, 256, 28, 28), "nchw", "NCHW"),
    ((64, 256, 28, 28), "nhwc", "NHWC"),
    ((256, 2048, 7, 7), "nchw", "NCHW"),
    ((256, 2048, 7, 7), "nhwc", "NHWC"),
    ((32, 3, 224, 224), "nhwc", "NHWC"),  # an RGB input, normalized channels-last
    ((65536, 512), "last", ""),
    ((64, 128, 1024), "last", ""),
    # Small calls, where per-call overhead decides: (N, C), (N, C) wide, NCHW, channels-last.
    ((64, 256), "last", "small"),
    ((128, 1024), "last", "small"),
    ((32, 64, 8, 8), "nchw", "NCHW small"),
    ((16, 64, 7, 7), "nhwc", "NHWC small"),
]
MODES = ("train", "infer", "backward")
# The byte model: passes over the data a call needs at least (a copy needs 2).
PASSES = {"train": 3, "infer": 2, "backward": 5}


def cases(batch_scale: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(label, shape, layout) of every case, its batch (first dimension) times `batch_scale`."""
    scaled = []
    for shape, layout, suffix in CASES:
        shape = (shape[0] * batch_scale, *shape[1:])
        scaled.append((f"({','.join(map(str, shape))}) {suffix}".rstrip(), shape, layout))
    return scaled


def stored_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "nhwc":
        return (shape[0], *shape[2:], shape[1])
    return shape


def feature_axis(layout: str) -> int:
    return 1 if layout == "nchw" else -1


# ---- the libraries: each returns {mode: zero-argument callable} for one case ---------------


def ours(x: Any, dy: Any, layout: str) -> dict[str, Callable[[], Any]]:
    """batchnorm as users call it: every call returns a new result."""
    layer = batchnorm.BatchNormalization(axis=feature_axis(layout), momentum=MOMENTUM)
    if not isinstance(x, np.ndarray):  # a torch CUDA tensor: the weights move to its device
        layer.to(str(x.device))
    layer(x, training=True)  # builds the weights; backward needs a training call
    return {
        "train": lambda: layer(x, training=True),
        "infer": lambda: layer(x),
        "backward": lambda: layer.backward(dy),
    }


def ours_into(x: Any, dy: Any, layout: str) -> dict[str, Callable[[], Any]]:
    """batchnorm writing into preallocated `out=` arrays (no allocation at all)."""
    layer = batchnorm.BatchNormalization(axis=feature_axis(layout), momentum=MOMENTUM)
    if isinstance(x, np.ndarray):
        y, dx = np.empty_like(x), np.empty_like(x)
    else:  # a torch CUDA tensor: weights and outputs live on its device, as the data does
        layer.to(str(x.device))
        y, dx = x.new_empty(x.shape), x.new_empty(x.shape)
    layer(x, training=True, out=y)
    return {
        "train": lambda: layer(x, training=True, out=y),
        "infer": lambda: layer(x, out=y),
        "backward": lambda: layer.backward(dy, out=dx),
    }


def torch_library(threads: int) -> Callable[..., dict[str, Callable[[], Any]]] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    functional = torch.nn.functional

    def as_torch(a: Any, layout: str) -> Any:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)  # CUDA data: tensors
        if layout == "nhwc":  # NCHW view in channels_last memory format: PyTorch's own layout
            return t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
        if layout == "last" and a.ndim > 2:  # (B, T, C) normalized over C is (B*T, C)
            return t.reshape(-1, a.shape[-1])
        return t

    def make(x: Any, dy: Any, layout: str) -> dict[str, Callable[[], Any]]:
        tx, tdy = as_torch(x, layout), as_torch(dy, layout)
        c = tx.shape[1]
        weight, bias = torch.ones(c, device=tx.device), torch.zeros(c, device=tx.device)
        mean, var = torch.zeros(c, device=tx.device), torch.ones(c, device=tx.device)
        # The backward a PyTorch user runs: autograd through functional.batch_norm, from a
        # graph built once (retain_graph keeps it for the next round).
        x_leaf = tx.detach().requires_grad_(True)
        weight_leaf, bias_leaf = (
            weight.clone().requires_grad_(True),
            bias.clone().requires_grad_(True),
        )
        graph_output = functional.batch_norm(
            x_leaf, mean.clone(), var.clone(), weight_leaf, bias_leaf, True, 1 - MOMENTUM, EPSILON
        )
        return {
            "train": lambda: functional.batch_norm(
                tx, mean, var, weight, bias, True, 1 - MOMENTUM, EPSILON
            ),
            "infer": lambda: functional.batch_norm(
                tx, mean, var, weight, bias, False, 1 - MOMENTUM, EPSILON
            ),
            "backward": lambda: torch.autograd.grad(
                graph_output, (x_leaf, weight_leaf, bias_leaf), tdy, retain_graph=True
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


def cuda_peak_growth_mib(torch: Any, call: Callable[[], Any]) -> float:
    """Growth of torch's CUDA allocations during one call (its temporaries and new outputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def memory_child(args: argparse.Namespace, libraries: dict[str, Any], modes: list[str]) -> None:
    """Prints {library: {mode: peak MiB}} for the one case --memory-of names, as JSON."""
    label, shape, layout = cases(args.batch_scale)[args.memory_of]
    x, dy = case_data(shape, layout, "cpu")
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


def case_data(shape: tuple[int, ...], layout: str, device: str) -> tuple[Any, Any]:
    """x and dy: NumPy arrays on the CPU, torch tensors made on the GPU for CUDA (generating
    hundreds of MiB there is faster than on the host and copying them over)."""
    if device == "cpu":
        rng = np.random.default_rng(0)
        x = rng.standard_normal(stored_shape(shape, layout), dtype=np.float32) * 2.0 + 0.5
        return x, rng.standard_normal(x.shape, dtype=np.float32)
    import torch

    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(stored_shape(shape, layout), generator=generator, device=device) * 2.0 + 0.5
    return x, torch.randn(x.shape, generator=generator, device=device)


def wall_seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def repeated(call: Callable[[], Any], repeats: int) -> Callable[[], None]:
    def calls() -> None:
        for _ in range(repeats):
            call()

    return calls


# A round of a small call lasts at least this long (see the module docstring).
ROUND_SECONDS = 1e-3


def cuda_seconds(torch: Any) -> Callable[[Callable[[], Any]], float]:
    """Times a call with CUDA events on the current stream (where both libraries queue their
    kernels), starting on an idle device so that the events bracket this call's work alone."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def seconds(call: Callable[[], Any]) -> float:
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return seconds


def interleaved(
    calls: dict[str, Callable[[], Any]], reps: int, seconds: Callable[[Callable[[], Any]], float]
) -> dict[str, list[float]]:
    """Times every library's call once per round, in an order that changes from round to round;
    on the host a call shorter than ROUND_SECONDS runs that long per round (the mean is kept).

    A call is slower right after another library's, which leaves the caches and the OpenMP team
    cold (a 1 ms call of batchnorm took 1.2 ms after a PyTorch op, 1.04-1.09 ms after its own),
    so each call goes next to the library that has followed the previous call least often
    (never the same library twice in a row, across rounds too): every library follows every
    other about equally often. Rotations of one order put the same library before a given one
    in two rounds out of three, which made the default call look 1.2x slower than the call into
    `out=` on (32, 3, 224, 224) when PyTorch's call preceded it."""
    names = list(calls)
    repeats = dict.fromkeys(names, 1)
    for name in names:  # warm-up: first-touch of outputs, thread pools, tracing, cuDNN plans
        calls[name]()
        once = seconds(calls[name])
        if seconds is wall_seconds:
            repeats[name] = max(1, int(ROUND_SECONDS / max(once, 1e-7)))
    timed = {name: repeated(calls[name], repeats[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    follows: Counter[tuple[str | None, str]] = Counter()
    previous: str | None = None
    for _ in range(reps):
        left = list(names)
        while left:
            name = min(left, key=lambda n: (n == previous, follows[(previous, n)]))
            left.remove(name)
            follows[(previous, name)] += 1
            previous = name
            times[name].append(seconds(timed[name]) / repeats[name])
    return times


def cuda_torch() -> Any:
    """torch, when both it and batchnorm reach a CUDA device; otherwise exits saying why."""
    try:
        import torch
    except ImportError:
        sys.exit("compare.py: --device cuda needs PyTorch built with CUDA (pip install torch)")
    problems = []
    if not torch.cuda.is_available():
        problems.append(f"PyTorch {torch.__version__} sees no CUDA device")
    if not batchnorm.cuda_available():
        problems.append(
            "batchnorm.cuda_available() is False (a build without the CUDA backend, or no GPU)"
        )
    if problems:
        sys.exit(f"compare.py: --device cuda: {'; '.join(problems)}")
    return torch


def bandwidth(mode: str, nbytes: int, times: dict[str, list[float]]) -> dict[str, float]:
    """batchnorm's and the copy probe's GB/s under the byte model, and batchnorm's % of the probe
    as the median of per-round ratios (robust to the bandwidth drifting between rounds)."""
    passes, ours_s, copy_s = PASSES[mode], times["batchnorm"], times["copy"]
    percents = [100 * passes * c / (2 * t) for t, c in zip(ours_s, copy_s)]
    return {
        "copy_ms": statistics.median(copy_s) * 1e3,
        "copy_gbps": 2 * nbytes / statistics.median(copy_s) / 1e9,
        "batchnorm_gbps": passes * nbytes / statistics.median(ours_s) / 1e9,
        "batchnorm_percent_of_copy": statistics.median(percents),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Times batchnorm against PyTorch's batch norm, NumPy and TensorFlow (those "
        "installed) on the cases of docs/performance.md, interleaved in one process, and draws "
        "the ratios.",
        epilog="The module docstring (python -c 'import bench.compare; help(bench.compare)') "
        "says what each column measures.",
    )
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
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the data lives and both batchnorm and PyTorch run (cuda: CUDA device 0)",
    )
    parser.add_argument(
        "--batch-scale",
        type=int,
        default=None,
        help="multiplies every case's batch (first dimension); default 4 on cuda, 1 on cpu",
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    cuda = args.device == "cuda"
    if args.batch_scale is None:
        args.batch_scale = 4 if cuda else 1
    if args.batch_scale < 1:
        parser.error("--batch-scale must be at least 1")
    torch = cuda_torch() if cuda else None

    wanted = set(args.libraries.split(","))
    libraries: dict[str, Callable[..., dict[str, Callable[[], Any]]]] = {
        "batchnorm": ours,
        "batchnorm_out": ours_into,
    }
    if "torch" in wanted and (torch_make := torch_library(args.threads)):
        libraries["torch"] = torch_make
    if not cuda:  # NumPy and TensorFlow (CPU builds) compute on the host
        if "tensorflow" in wanted and (tf_make := tensorflow_library()):
            libraries["tensorflow"] = tf_make
        if "numpy" in wanted:
            libraries["numpy"] = numpy_library
    others = [name for name in libraries if name not in ("batchnorm", "batchnorm_out")]
    if args.memory_of is not None:
        memory_child(args, libraries, modes)
        return
    selected = [
        (i, case) for i, case in enumerate(cases(args.batch_scale)) if args.cases in case[0]
    ]
    if not selected:
        parser.error(f"no case label contains {args.cases!r}")

    scaled = f", batch x{args.batch_scale}" if args.batch_scale != 1 else ""
    header = f"{'case':24} {'mode':8} {'batchnorm':>10} {'out=':>8}"
    if cuda:
        where = torch.cuda.get_device_name(0)
        print(
            f"{len(libraries)} libraries ({', '.join(libraries)}) on {where}{scaled},"
            f" {args.reps} interleaved rounds; median ms (CUDA events), ratio = other / batchnorm,"
            " GB/s under the byte model (train 3 passes, infer 2, backward 5, copy 2),"
            " copy = device-to-device copy of the input in the same rounds, % copy = median of"
            " per-round ratios, peak = growth of torch.cuda.max_memory_allocated during a call"
            " (MiB)"
        )
        header += f" {'GB/s':>7} {'copy':>7} {'% copy':>6}"
    else:
        where = f"{args.threads} threads"
        print(
            f"{len(libraries)} libraries ({', '.join(libraries)}), {where}{scaled},"
            f" {args.reps} interleaved rounds; median ms, ratio = other / batchnorm,"
            " peak = resident growth during a call (MiB)"
        )
    header += f" {'peak':>6} {'out=':>6}"
    for name in others:
        header += f" {name:>10} {'ratio':>6} {'peak':>6}"
    print(header)

    rows = []
    seconds = cuda_seconds(torch) if cuda else wall_seconds
    child_argv = ["--threads", str(args.threads), "--modes", args.modes]
    child_argv += ["--libraries", args.libraries, "--batch-scale", str(args.batch_scale)]
    for index, (label, shape, layout) in selected:
        x, dy = case_data(shape, layout, "cuda:0" if cuda else "cpu")
        per_library = {name: make(x, dy, layout) for name, make in libraries.items()}
        if cuda:  # the bandwidth probe: a copy of the input, on the same device
            per_library["copy"] = dict.fromkeys(modes, partial(torch.empty_like(x).copy_, x))
        memory = {} if args.no_memory or cuda else peaks_of(index, child_argv)
        for mode in modes:
            calls = {name: per_library[name][mode] for name in per_library}
            times = interleaved(calls, args.reps, seconds)
            medians = {name: statistics.median(t) for name, t in times.items()}
            if cuda and not args.no_memory:
                peaks = {name: cuda_peak_growth_mib(torch, calls[name]) for name in libraries}
            else:
                peaks = {name: memory.get(name, {}).get(mode) for name in libraries}
            row = {
                "case": label,
                "mode": mode,
                "input_mib": x.nbytes / 2**20,
                **{f"{name}_ms": medians[name] * 1e3 for name in libraries},
                **{f"{name}_peak_mib": peaks[name] for name in libraries},
                **{f"{name}_ratio": medians[name] / medians["batchnorm"] for name in others},
            }
            line = f"{label:24} {mode:8} {row['batchnorm_ms']:10.4f} {row['batchnorm_out_ms']:8.4f}"
            if cuda:
                row.update(bandwidth(mode, x.nbytes, times))
                line += f" {row['batchnorm_gbps']:7.0f} {row['copy_gbps']:7.0f}"
                line += f" {row['batchnorm_percent_of_copy']:5.0f}%"
            rows.append(row)
            line += f" {_mib(peaks['batchnorm'])} {_mib(peaks['batchnorm_out'])}"
            for name in others:
                line += (
                    f" {row[f'{name}_ms']:10.4f} {row[f'{name}_ratio']:5.1f}x {_mib(peaks[name])}"
                )
            print(line, flush=True)
        del per_library, calls

    if args.csv:
        with open(args.csv, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.png:
        chart(rows, others, args.png, f"float32, {where}{scaled}")


def _mib(value: float | None) -> str:
    return f"{'n/a':>6}" if value is None else f"{value:6.1f}"


def chart(rows: list[dict[str, Any]], others: list[str], path: str, setting: str) -> None:
    """One horizontal bar per case and mode, per compared library: how many times longer the
    other library takes than batchnorm, on a log axis, drawn from 1x (same speed) — to the right
    where batchnorm is faster, to the left where it is slower — with the factor written on it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        print("matplotlib is not installed: no chart written")
        return
    labels = [f"{r['case']}  {r['mode']}" for r in rows]
    positions = np.arange(len(rows))[::-1]  # the first case on top
    ratios = {name: np.array([r[f"{name}_ratio"] for r in rows]) for name in others}
    every = np.concatenate(list(ratios.values())) if ratios else np.ones(1)
    low = 2.0 ** np.floor(np.log2(min(every.min(), 1.0) / 1.5))
    high = 2.0 ** np.ceil(np.log2(max(every.max(), 1.0) * 1.5))
    ticks = [2.0**k for k in range(int(np.log2(low)), int(np.log2(high)) + 1)]

    def factor(value: float, _: Any = None) -> str:
        return f"{value:g}x" if value >= 1 else f"1/{1 / value:g}x"

    fig, panels = plt.subplots(
        1,
        max(len(others), 1),
        figsize=(4.5 * max(len(others), 1) + 3, 0.32 * len(rows) + 1.6),
        sharey=True,
        squeeze=False,
    )
    for panel, name in zip(panels[0], others):
        values = ratios[name]
        colors = ["#2a9d4b" if v >= 1 else "#d1495b" for v in values]
        panel.barh(positions, values - 1, left=1, height=0.7, color=colors)
        panel.axvline(1.0, color="black", linewidth=1)
        panel.set_xscale("log")
        panel.set_xlim(low, high)
        panel.xaxis.set_major_locator(FixedLocator(ticks))
        panel.xaxis.set_minor_locator(NullLocator())
        panel.xaxis.set_major_formatter(FuncFormatter(factor))
        panel.grid(axis="x", color="#dddddd", linewidth=0.6)
        panel.set_axisbelow(True)
        for y, v in zip(positions, values):
            panel.text(
                v * (1.06 if v >= 1 else 1 / 1.06),
                y,
                f"{v:.1f}x" if v >= 1 else f"{v:.2f}x",
                va="center",
                ha="left" if v >= 1 else "right",
                fontsize=8,
            )
        panel.set_title(f"{name}: its time / batchnorm's", fontsize=10)
        panel.set_xlabel("<- batchnorm slower | batchnorm faster ->", fontsize=9)
    panels[0][0].set_yticks(positions, labels, fontsize=8)
    fig.suptitle(f"batchnorm against other libraries ({setting}; median of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
