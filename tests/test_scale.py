"""Scale edges: more than 2^31 logical elements (stride-0 views: counts, offsets and chunk
indices must not overflow 32 bits), rank 8 and the rank-9 error, feature counts of 1 and 2^20,
and resident memory that stays flat over 10,000 calls."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import batchnorm

from reference import ReferenceBN
from resident import resident_bytes


def repeated(base: np.ndarray, repeats: int, writeable: bool = False) -> np.ndarray:
    """`base` repeated `repeats` times along a new leading axis, as a stride-0 view."""
    return as_strided(
        base, (repeats, *base.shape), (0, *base.strides), writeable=writeable, subok=False
    )


@pytest.mark.parametrize(
    "base_shape,axis",
    # A row layout (64 features per row) and a plane layout (8 features, runs of 1024).
    [((256, 64), -1), ((2, 8, 1024), 1)],
    ids=["rows", "planes"],
)
def test_more_than_2_31_logical_elements(base_shape: tuple[int, ...], axis: int) -> None:
    """A (R, *base) stride-0 view of more than 2^31 elements has the statistics of `base` (each
    value R times): training, inference and backward must give the results on `base` alone. The
    outputs are stride-0 views too (every repeat writes the same values)."""
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 2.0, base_shape).astype(np.float32)
    base_dy = rng.normal(size=base_shape).astype(np.float32)
    repeats = (1 << 31) // base.size + 1
    x, dy = repeated(base, repeats), repeated(base_dy, repeats)
    assert x.size > 1 << 31
    y_base, dx_base = np.empty_like(base), np.empty_like(base)
    y, dx = repeated(y_base, repeats, writeable=True), repeated(dx_base, repeats, writeable=True)

    layer = batchnorm.BatchNormalization(axis=axis + 1 if axis >= 0 else axis, momentum=0.5)
    reference = ReferenceBN(axis=axis, momentum=0.5)
    layer(x, training=True, out=y)
    want_y = reference.forward(base.astype(np.float64), training=True)
    np.testing.assert_allclose(y_base, want_y, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(
        layer.options.weight_names(), layer.get_weights(), reference.get_weights()
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    layer.backward(dy, out=dx)
    want_dx, want_dgamma, want_dbeta = reference.backward(base_dy.astype(np.float64))
    # dx of a batch repeated R times: the base's, as mean and variance do not change.
    np.testing.assert_allclose(dx_base, want_dx, rtol=1e-3, atol=1e-3)
    gradients = {k: np.asarray(v).reshape(-1) for k, v in layer.gradients.items()}
    np.testing.assert_allclose(gradients["gamma"], want_dgamma * repeats, rtol=1e-4, atol=1.0)
    np.testing.assert_allclose(gradients["beta"], want_dbeta * repeats, rtol=1e-4, atol=1.0)

    layer(x, out=y)
    want_y = reference.forward(base.astype(np.float64))
    np.testing.assert_allclose(y_base, want_y, rtol=1e-5, atol=1e-5)


def test_rank_8_works_and_rank_9_is_a_clear_error() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 2, 1, 2, 3, 1, 2, 4)).astype(np.float32)
    for axis in (-1, [1, 6]):
        layer, reference = batchnorm.BatchNormalization(axis=axis), ReferenceBN(axis=axis)
        np.testing.assert_allclose(
            layer(x, training=True),
            reference.forward(x.astype(np.float64), training=True),
            rtol=1e-4,
            atol=1e-4,
        )
        dy = rng.normal(size=x.shape).astype(np.float32)
        np.testing.assert_allclose(
            layer.backward(dy), reference.backward(dy.astype(np.float64))[0], rtol=1e-4, atol=1e-4
        )
    layer = batchnorm.BatchNormalization()
    with pytest.raises(ValueError, match="rank"):
        layer(np.ones((2,) * 9, np.float32), training=True)
    assert not layer.built  # nothing was created for the refused input


@pytest.mark.parametrize("shape", [(64, 1), (3, 1 << 20)], ids=["one feature", "2^20 features"])
def test_feature_counts_of_1_and_2_20(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 3.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    layer, reference = batchnorm.BatchNormalization(momentum=0.0), ReferenceBN(momentum=0.0)
    np.testing.assert_allclose(
        layer(x, training=True),
        reference.forward(x.astype(np.float64), training=True),
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        layer.backward(dy), reference.backward(dy.astype(np.float64))[0], rtol=1e-3, atol=1e-3
    )
    for name, got, want in zip(
        layer.options.weight_names(), layer.get_weights(), reference.get_weights()
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_flat_over_10000_calls() -> None:
    """Training, backward, an SGD step and inference, 10,000 calls in all, on a small input and
    on one whose results come from the buffer cache: no growth beyond a few pages."""
    rng = np.random.default_rng(3)
    inputs: list[Any] = [
        rng.normal(size=(16, 8)).astype(np.float32),
        rng.normal(size=(4, 8, 96, 96)).astype(np.float32),  # 1.2 MB: cached results
    ]
    for x, calls in zip(inputs, (8000, 2000)):
        layer = batchnorm.BatchNormalization(axis=1)
        dy = np.ones_like(x)
        for _ in range(50):  # caches and allocator pools settle
            _train_step(layer, x, dy)
        start = resident_bytes()
        for _ in range(calls // 4):
            _train_step(layer, x, dy)
        grown = resident_bytes() - start
        assert grown < 1 << 20, f"{grown} bytes more resident after {calls} calls on {x.shape}"


def _train_step(layer: Any, x: np.ndarray, dy: np.ndarray) -> None:
    layer(x, training=True)
    layer.backward(dy)
    layer.apply_gradients(0.01)
    layer(x)
