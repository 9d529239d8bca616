"""The CPU backend computes the per-feature coefficients of plain calls (one group, no renorm,
no adjustment) in vectorized loops over all features, and every other call feature by feature.
The two paths must agree bit for bit. An adjustment of scale 1 and bias 0 changes nothing in
the arithmetic of a forward call but takes the per-feature path; a ghost batch as large as the
batch does the same for the backward. Each case runs both ways and compares outputs, moving
statistics and gradients exactly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from batchnorm import functional


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bytes: NaN payloads and signed zeros included."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _data(shape: tuple[int, ...], dtype: str, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if kind == "offset":  # |mean| >> std: the shift's remainder matters
        x = (1e6 if dtype in ("float32", "float64") else 300.0) + x
    elif kind == "zeros":  # signed zeros: means of -0.0
        x = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
    elif kind == "special":
        x = x.copy()
        x[0, 0] = np.nan
        x[1, 1] = np.inf
    elif kind == "denormal":  # scales beyond float32's range: the split (prescale) path
        x = x * 1e-42
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def _run(x, options, weights, adjustment, mask):
    bound = functional.bind({name: vector.copy() for name, vector in weights.items()})
    y, context = functional.forward(
        x, bound, options, training=True, mask=mask, adjustment=adjustment
    )
    dy = np.cos(np.arange(x.size, dtype=np.float64)).reshape(x.shape).astype(x.dtype)
    dx, dgamma, dbeta = functional.backward(dy, context)
    moving = {name: bound.vector(name) for name in ("moving_mean", "moving_variance")}
    return y, dx, dgamma, dbeta, moving


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["normal", "offset", "zeros", "special", "denormal"])
@pytest.mark.parametrize(("center", "scale"), [(True, True), (False, True), (True, False)])
# 600 features: the row pass takes each block of 256 features' coefficients as soon as its
# statistics are merged, so that gamma's infinity below sends the first block alone to the split
# path, the others keeping the vectorized loops.
@pytest.mark.parametrize("features", [40, 600])
def test_plain_coefficients_match_the_per_feature_path(dtype, kind, center, scale, features):
    epsilon = 1e-30 if kind == "denormal" else 1e-3
    options = functional.Options(axis=-1, center=center, scale=scale, epsilon=epsilon)
    x = _data((24, features), dtype, kind, seed=len(kind))
    weight_dtype = "float64" if dtype == "float64" else "float32"
    weights = functional.initial_weights(options, x.shape, weight_dtype)
    rng = np.random.default_rng(1)
    for name in weights:
        if name in ("gamma", "beta", "moving_mean"):
            weights[name] = rng.standard_normal(features).astype(weights[name].dtype)
    if "gamma" in weights:  # a signed zero and an infinity (whose scale takes the split path)
        weights["gamma"][3] = -0.0
        weights["gamma"][4] = np.inf
        weights["gamma"][5] = 2.0
    if "beta" in weights:  # 0 * gamma + beta is +0 here, not beta
        weights["beta"][5] = -0.0
    identity = (np.ones(features, weight_dtype), np.zeros(features, weight_dtype))
    for mask in (None, np.arange(24) % 3 != 0, np.zeros(24, bool)):
        plain = _run(x, options, weights, None, mask)
        per_feature = _run(x, options, weights, identity, mask)
        for got, want in zip(plain[:4], per_feature[:4]):
            assert (got is None) == (want is None)
            if got is not None:
                assert bits_equal(np.asarray(got), np.asarray(want))
        for name in plain[4]:
            assert bits_equal(np.asarray(plain[4][name]), np.asarray(per_feature[4][name])), name


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("kind", ["normal", "offset", "zeros", "special"])
@pytest.mark.parametrize(("center", "scale"), [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("features", [40, 600])  # 600: blocks of 256 in the row pass, as above
def test_one_group_backward_matches_the_per_feature_path(dtype, kind, center, scale, features):
    """A ghost batch as large as the batch is one group computed feature by feature (the ghost
    path); without ghost batches the same group takes the vectorized loops."""
    x = _data((24, features), dtype, kind, seed=7 + len(kind))
    runs = []
    for virtual_batch_size in (None, 24):
        options = functional.Options(
            axis=-1, center=center, scale=scale, virtual_batch_size=virtual_batch_size
        )
        weights = functional.initial_weights(
            options, x.shape, "float64" if dtype == "float64" else "float32"
        )
        if "gamma" in weights:
            weights["gamma"][:] = np.linspace(-2.0, 2.0, features)
        runs.append([_run(x, options, weights, None, mask) for mask in (None, np.zeros(24, bool))])
    for plain, per_feature in zip(*runs):
        for got, want in zip(plain[:4], per_feature[:4]):
            assert (got is None) == (want is None)
            if got is not None:
                assert bits_equal(np.asarray(got), np.asarray(want))
