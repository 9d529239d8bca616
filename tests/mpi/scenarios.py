"""Synchronized training across MPI processes, one scenario per launch:
``mpiexec -n N python -m mpi4py tests/mpi/scenarios.py SCENARIO`` (tests/test_mpi.py runs them).

Every process draws every process's data from a shared seed, runs its synchronized layer on its
own part and, itself, the single-process layer on the concatenated batch; it then checks its
outputs, dx, dgamma, dbeta and weights against that reference and that the moving statistics
and gradients are bitwise equal on all processes. Any failure raises, and ``-m mpi4py`` aborts
the whole job instead of leaving the other processes waiting in a collective."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

import batchnorm

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()

# Per-process batch sizes: unequal, and process 2 (of 3) has no samples at all.
BATCHES = (6, 10, 0, 4)


def batch_of(rank: int) -> int:
    return BATCHES[rank % len(BATCHES)]


def draw(seed: int, make: Callable[[np.random.Generator, int], np.ndarray]) -> list[np.ndarray]:
    """Every process's array, drawn from its own stream of a shared seed."""
    return [make(np.random.default_rng([seed, rank]), batch_of(rank)) for rank in range(SIZE)]


def close(got: Any, expected: Any, what: str, rtol: float = 2e-5) -> None:
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(
        got, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), err_msg=f"rank {RANK}: {what}"
    )


def same_everywhere(arrays: list[np.ndarray], what: str) -> None:
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    for rank, theirs in enumerate(COMM.allgather(mine)):
        assert theirs == mine, f"rank {RANK}: {what} differ bitwise from rank {rank}'s"


def compare_training(
    config: dict[str, Any],
    xs: list[np.ndarray],
    dys: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
    order: Callable[[int], np.ndarray] | None = None,
    steps: int = 3,
    communicator: Any = None,
    rtol: float = 2e-5,
) -> None:
    """Trains a synchronized layer here and the single-process layer on the concatenated batch
    for `steps` steps (forward, backward, SGD step) and compares everything after each.
    `order(rank)` gives where this process's samples sit in the concatenated batch."""
    if order is None:
        starts = np.cumsum([0] + [len(x) for x in xs])
        order = lambda rank: np.arange(starts[rank], starts[rank + 1])  # noqa: E731
    total = sum(len(x) for x in xs)
    index = [order(rank) for rank in range(SIZE)]

    def concatenate(parts: list[np.ndarray]) -> np.ndarray:
        full = np.empty((total,) + parts[0].shape[1:], parts[0].dtype)
        for rank, part in enumerate(parts):
            full[index[rank]] = part
        return full

    layer = batchnorm.BatchNormalization(synchronized=True, communicator=communicator, **config)
    single = batchnorm.BatchNormalization(**config)
    x, dy, mask = xs[RANK], dys[RANK], masks[RANK] if masks else None
    all_x, all_dy = concatenate(xs), concatenate(dys)
    all_mask = concatenate(masks) if masks else None
    for step in range(steps):
        y = layer(x, training=True, mask=mask)
        dx = layer.backward(dy)
        expected_y = single(all_x, training=True, mask=all_mask)
        expected_dx = single.backward(all_dy)
        label = f"step {step}"
        close(y, expected_y[index[RANK]], f"{label} y", rtol)
        close(dx, expected_dx[index[RANK]], f"{label} dx", rtol)
        for key, value in single.gradients.items():
            close(layer.gradients[key], value, f"{label} d{key}", rtol)
        for got, expected in zip(layer.weights, single.weights):
            close(got.numpy(), expected.numpy(), f"{label} {got.name}", rtol)
        same_everywhere(layer.get_weights(), f"{label} weights")
        same_everywhere(list(layer.gradients.values()), f"{label} gradients")
        layer.apply_gradients(0.1)
        single.apply_gradients(0.1)
    # Inference needs no communication and uses the (identical) moving statistics.
    close(layer(x), single(all_x)[index[RANK]], "inference y", rtol)


def nchw() -> None:
    """Default communicator (MPI.COMM_WORLD), NCHW, unequal batches, an empty process."""
    xs = draw(1, lambda g, n: g.normal(2.0, 3.0, (n, 8, 5, 3)).astype(np.float32))
    dys = draw(2, lambda g, n: g.normal(0.0, 1.0, (n, 8, 5, 3)).astype(np.float32))
    compare_training({"axis": 1, "momentum": 0.8}, xs, dys)


def channels_last_mask() -> None:
    """(B, T, C) with masks; process 1 masks out all its positions."""
    xs = draw(3, lambda g, n: g.normal(-1.0, 2.0, (n, 7, 6)).astype(np.float32))
    dys = draw(4, lambda g, n: g.normal(0.0, 1.0, (n, 7, 6)).astype(np.float32))
    masks = draw(5, lambda g, n: g.uniform(size=(n, 7)) < 0.6)
    if SIZE > 1:
        masks[1][...] = False
    compare_training({"momentum": 0.5}, xs, dys, masks, communicator=COMM.Dup())


def float64_axes() -> None:
    """float64 with an axis list, to tight tolerances."""
    xs = draw(6, lambda g, n: g.normal(1.0, 1.5, (n, 3, 4, 5)))
    dys = draw(7, lambda g, n: g.normal(0.0, 1.0, (n, 3, 4, 5)))
    config = {"axis": [1, 3], "momentum": 0.7, "dtype": "float64"}
    compare_training(config, xs, dys, communicator=COMM, rtol=1e-11)


def renorm() -> None:
    """Batch renormalization: r and d from the global statistics, clipped."""
    xs = draw(8, lambda g, n: g.normal(4.0, 0.5, (n, 9)).astype(np.float32))
    dys = draw(9, lambda g, n: g.normal(0.0, 1.0, (n, 9)).astype(np.float32))
    config = {
        "renorm": True,
        "renorm_momentum": 0.6,
        "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 1.0},
        "momentum": 0.6,
    }
    compare_training(config, xs, dys, steps=4)


def ghost_batches() -> None:
    """Ghost batches stay per process: the concatenated batch is ordered so that its interleaved
    ghost batches (ghost j = samples j, j + G, ...) are exactly the processes' own ones. With a
    mask and renorm, whose r and d use the average over every process's ghost batches."""
    v = 2
    xs = draw(10, lambda g, n: g.normal(1.0, 2.0, (n, 3, 4)).astype(np.float32))
    dys = draw(11, lambda g, n: g.normal(0.0, 1.0, (n, 3, 4)).astype(np.float32))
    masks = draw(12, lambda g, n: g.uniform(size=(n, 3)) < 0.7)
    groups = [batch_of(rank) // v for rank in range(SIZE)]
    first = np.cumsum([0] + groups)

    def order(rank: int) -> np.ndarray:
        local = np.arange(batch_of(rank))
        return first[rank] + local % groups[rank] + (local // groups[rank]) * first[-1]

    config = {"axis": -1, "virtual_batch_size": v, "renorm": True, "momentum": 0.5}
    compare_training(config, xs, dys, masks, order=order)


def large_mean() -> None:
    """|mean| / std = 1e6 in float32: the global variance stays exact (Chan merge, never
    E[x^2] - E[x]^2), against float64 NumPy on the concatenated float32 data."""
    xs = draw(13, lambda g, n: (1e6 + g.normal(0.0, 1.0, (n, 4))).astype(np.float32))
    layer = batchnorm.BatchNormalization(synchronized=True, momentum=0.0)
    layer(xs[RANK], training=True)
    data = np.concatenate(xs).astype(np.float64)
    close(layer.moving_mean.numpy(), data.mean(axis=0), "moving_mean", 1e-7)
    close(layer.moving_variance.numpy(), data.var(axis=0), "moving_variance", 1e-5)
    same_everywhere(layer.get_weights(), "weights")


def split_groups() -> None:
    """Sub-communicators: even and odd processes synchronize separately; a process alone in
    its group (size 1) gets exactly, bitwise, the unsynchronized result."""
    sub = COMM.Split(RANK % 2, RANK)
    xs = draw(14, lambda g, n: g.normal(0.0, 1.0, (n, 5)).astype(np.float32))
    layer = batchnorm.BatchNormalization(synchronized=True, communicator=sub)
    members = [rank for rank in range(SIZE) if rank % 2 == RANK % 2]
    y = layer(xs[RANK], training=True)
    single = batchnorm.BatchNormalization()
    if sub.Get_size() == 1:
        np.testing.assert_array_equal(y, single(xs[RANK], training=True))
        for got, expected in zip(layer.get_weights(), single.get_weights()):
            np.testing.assert_array_equal(got, expected)
    else:
        expected = single(np.concatenate([xs[r] for r in members]), training=True)
        start = sum(batch_of(r) for r in members if r < RANK)
        close(y, expected[start : start + batch_of(RANK)], "y")
        close(layer.moving_variance.numpy(), single.moving_variance.numpy(), "moving_variance")


def invalid_communicators() -> None:
    """Communicators that cannot synchronize are refused when the layer is made."""
    for communicator, text in ((MPI.COMM_NULL, "COMM_NULL"),):
        try:
            batchnorm.BatchNormalization(synchronized=True, communicator=communicator)
        except ValueError as error:
            assert text in str(error), error
        else:
            raise AssertionError(f"{text} was accepted")
    if SIZE > 1:
        local = COMM.Split(RANK % 2, RANK)
        inter = local.Create_intercomm(0, COMM, 1 - RANK % 2)
        try:
            batchnorm.BatchNormalization(synchronized=True, communicator=inter)
        except ValueError as error:
            assert "intercommunicator" in str(error), error
        else:
            raise AssertionError("an intercommunicator was accepted")
        inter.Free()
        local.Free()


def single_process() -> None:
    """One process: synchronized=True is bitwise the unsynchronized layer."""
    assert SIZE == 1
    g = np.random.default_rng(15)
    x = g.normal(3.0, 2.0, (6, 4, 5)).astype(np.float32)
    dy = g.normal(size=x.shape).astype(np.float32)
    a = batchnorm.BatchNormalization(axis=1, synchronized=True)
    b = batchnorm.BatchNormalization(axis=1)
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    for key in b.gradients:
        np.testing.assert_array_equal(a.gradients[key], b.gradients[key])
    for got, expected in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(got, expected)


SCENARIOS = {
    f.__name__: f
    for f in (
        nchw,
        channels_last_mask,
        float64_axes,
        renorm,
        ghost_batches,
        large_mean,
        split_groups,
        invalid_communicators,
        single_process,
    )
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
    COMM.Barrier()
    if RANK == 0:
        print(f"passed: {sys.argv[1]} on {SIZE} processes")
