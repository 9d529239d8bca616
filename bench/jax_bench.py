"""batchnorm.jax against Flax's BatchNorm on the CPU: a training forward + backward under
`jax.jit` on the performance shapes (channels-last, as JAX lays them out), and the per-call cost
of a small call, in one process with interleaved repetitions (the machines are shared and noisy:
compare the ratios of one run, not absolute times across runs).

    pip install . jax flax          # or build with -C cmake.define.BATCHNORM_BUILD_JAX_FFI=ON
    python bench/jax_bench.py --threads 2

Each step computes y, the new moving statistics, dx, dgamma and dbeta (jax.vjp of the training
call with a given dy), jitted once and called on the same arrays. Columns: "ffi" is
batch_norm's XLA FFI route (when this build has the handlers), "callback" its pure_callback route,
"flax" flax.linen.BatchNorm with Keras' momentum and epsilon (the statistics and
normalization code flax.nnx.BatchNorm shares, compiled by XLA).
Two columns give the context: "x + 1" is a jitted call that only adds 1 to x (the floor of a
jitted call that returns one array of x's size: XLA allocates its result), "numpy" the eager
functional forward + backward on NumPy arrays (batchnorm without JAX, results from the
package's buffer cache)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

if __name__ == "__main__":  # OpenMP reads its settings at start-up: fix them first
    from _threads import restart_with_threads

    restart_with_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen  # noqa: E402

import batchnorm.jax as bnj  # noqa: E402
from batchnorm import functional as F  # noqa: E402

CASES = [
    (32, 112, 112, 64),
    (64, 28, 28, 256),
    (256, 7, 7, 2048),
    (65536, 512),
    (64, 128, 1024),
    (64, 256),
    (128, 1024),
    (32, 8, 8, 64),
]
SMALL = (64, 256)


def ours(route: str) -> Callable[..., Any]:
    def step(x: Any, params: Any, state: Any, dy: Any) -> Any:
        def call(x: Any, params: Any) -> Any:
            return bnj.batch_norm(x, params, state, training=True, route=route)

        y, backward, new_state = jax.vjp(call, x, params, has_aux=True)
        return y, new_state, backward(dy)

    return jax.jit(step)


def flax_step(features: int) -> Callable[..., Any]:
    module = linen.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3)

    def step(x: Any, params: Any, state: Any, dy: Any) -> Any:
        def call(x: Any, params: Any) -> Any:
            variables = {"params": params, "batch_stats": state}
            return module.apply(variables, x, mutable=["batch_stats"])

        y, backward, new_state = jax.vjp(call, x, params, has_aux=True)
        return y, new_state, backward(dy)

    return jax.jit(step)


def _inputs(shape: tuple[int, ...]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    features = shape[-1]
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    dy = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    variables = linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    return {
        "x": x,
        "dy": dy,
        "ours": (
            {"gamma": jnp.ones(features), "beta": jnp.zeros(features)},
            {"moving_mean": jnp.zeros(features), "moving_variance": jnp.ones(features)},
        ),
        "flax": (variables["params"], variables["batch_stats"]),
    }


def _time(call: Callable[[], Any], seconds: float) -> float:
    """Seconds per call: one call, or the mean of enough repeats to fill `seconds`."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    once = time.perf_counter() - start
    repeats = max(1, int(seconds / max(once, 1e-7)))
    if repeats == 1:
        return once
    start = time.perf_counter()
    for _ in range(repeats):
        result = call()
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / repeats


def _steps(shape: tuple[int, ...]) -> dict[str, Callable[[], Any]]:
    data = _inputs(shape)
    x, dy = data["x"], data["dy"]
    routes = ["ffi", "callback"] if bnj.ffi_available() else ["callback"]
    steps = {}
    for route in routes:
        function = ours(route)
        params, state = data["ours"]
        steps[route] = lambda f=function, p=params, s=state: f(x, p, s, dy)
    function = flax_step(shape[-1])
    params, state = data["flax"]
    steps["flax"] = lambda f=function, p=params, s=state: f(x, p, s, dy)
    plus_one = jax.jit(lambda x: x + 1)
    steps["x + 1"] = lambda: plus_one(x)
    options = F.Options()
    host_x, host_dy = np.asarray(x), np.asarray(dy)
    weights = F.Weights(**F.initial_weights(options, shape))

    def eager() -> Any:
        _, context = F.forward(host_x, weights, options, training=True)
        return F.backward(host_dy, context)[0]

    steps["numpy"] = eager
    return steps


def _medians(shape: tuple[int, ...], rounds: int, seconds: float) -> dict[str, float]:
    steps = _steps(shape)
    for step in steps.values():  # compile and warm up
        jax.block_until_ready(step())
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(_time(step, seconds))
    return {name: statistics.median(values) for name, values in times.items()}


def run(cases: list[tuple[int, ...]], rounds: int, seconds: float) -> None:
    print("training forward + backward, median ms per step")
    header = None
    for shape in cases:
        medians = _medians(shape, rounds, seconds)
        if header is None:
            header = list(medians)
            print(f"{'shape':>22} " + " ".join(f"{n:>10}" for n in header) + "  flax/ours")
        best = min(medians[n] for n in ("ffi", "callback") if n in medians)
        row = " ".join(f"{1e3 * medians[n]:10.3f}" for n in header)
        print(f"{str(shape):>22} {row}  {medians['flax'] / best:8.2f}x")


def overhead(rounds: int, seconds: float) -> None:
    """Per-call cost on SMALL, in microseconds."""
    medians = _medians(SMALL, rounds, seconds)
    print(f"\nper-call cost on {SMALL}, forward + backward, median µs per step")
    for name, value in medians.items():
        print(f"{name:>10} {1e6 * value:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.05, help="time filled per round")
    parser.add_argument("--small-only", action="store_true", help="only the per-call table")
    args = parser.parse_args()
    threads = os.environ["OMP_NUM_THREADS"]
    print(f"jax {jax.__version__}, {jax.devices()[0]}, OMP_NUM_THREADS={threads}")
    if not args.small_only:
        run(CASES, args.rounds, args.seconds)
    overhead(args.rounds, args.seconds)


if __name__ == "__main__":
    main()
