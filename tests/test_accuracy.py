"""Float32 data whose mean is 1e6 times its spread still gets its batch variance to
1e-5 relative of a float64 computation on the same float32 values, in every layout the kernels
specialize (channels-last rows, NCHW planes with long and short runs, dense) and with masks and
ghost batches. The one-pass formula E[x^2] - E[x]^2 fails this even in float64 (checked too, so
the data is known to be hard enough).

The outputs are exact too: with |mean|/std up to 1e6, y and dx of float32 data stay within 1e-4
(absolute, on unit-variance data) of a float64 computation on the same float32 values, in every
layout and mode, where subtracting the float32-rounded mean would be off by ~6e-8 |mean|/std.
16-bit data keeps its outputs within one rounding of the float64 result, and float64 data (and
inference, which subtracts the float32 moving mean itself) was never affected."""

from __future__ import annotations

import numpy as np
import pytest

from reference import ReferenceBN

batchnorm = pytest.importorskip("batchnorm")

MEAN_OVER_STD = 1e6


def _large_mean_data(shape: tuple[int, ...], axis: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    feature_shape = [1] * len(shape)
    feature_shape[axis] = shape[axis]
    # Per-feature spreads (and means 1e6 times them) so every statistic is a different problem.
    std = rng.uniform(0.5, 4.0, size=feature_shape)
    return (MEAN_OVER_STD * std + rng.standard_normal(shape) * std).astype(np.float32)


def _reference(x: np.ndarray, axis: int, mask: np.ndarray | None, groups: int):
    """Per-feature mean over ghost groups of each group's mean and biased variance (float64)."""
    x64 = np.moveaxis(x.astype(np.float64), axis, -1)
    features = x64.shape[-1]
    rows = x64.reshape(x64.shape[0], -1, features)
    if mask is None:
        valid = np.ones(rows.shape[:2], bool)
    else:  # a full-rank mask with size 1 on the feature axis
        valid = np.moveaxis(mask, axis, -1).reshape(rows.shape[:2])
    means, variances = [], []
    for g in range(groups):  # Keras' ghost batch g holds samples g, g + G, ...
        values = rows[g::groups][valid[g::groups]]
        means.append(values.mean(axis=0))
        variances.append(((values - values.mean(axis=0)) ** 2).mean(axis=0))
    return np.mean(means, axis=0), np.mean(variances, axis=0), rows[valid]


CASES = {
    "nchw": ((64, 8, 32, 32), 1, None, False),
    "nchw_short_runs": ((256, 48, 7, 7), 1, None, False),
    "nchw_mask_ghost": ((64, 8, 32, 32), 1, 16, True),
    "nhwc": ((64, 32, 32, 8), -1, None, False),
    "nhwc_mask_ghost": ((64, 32, 32, 8), -1, 16, True),
    "dense": ((65536, 12), -1, None, False),
}


@pytest.mark.parametrize("deviations", [3.9, 100.0, 1e4])
@pytest.mark.parametrize(
    "shape", [(512, 32), (8, 8, 8, 32), (500, 37), (4096, 3), (999, 7), (2048, 24)]
)
def test_variance_with_an_outlier_first_row(shape, deviations):
    """Row statistics sum x minus each chunk's first valid row: an outlier there (a spike in
    ReLU activations) puts the shift many standard deviations from the mean, where rounding in
    the sums would show in the variance once it cancels. The variance must stay as exact as the
    float64 computation's. (Summing rows in float32 blocks, tried for speed, failed this at 100
    and 1e4 deviations.)"""
    rng = np.random.default_rng(int(deviations))
    features = shape[-1]
    std = rng.uniform(0.1, 10.0, size=features)
    x = (rng.standard_normal(shape) * std + rng.uniform(-5, 5, size=features) * std).astype(
        np.float32
    )
    rows = x.reshape(-1, features)
    sign = np.where(rng.random(features) < 0.5, -1.0, 1.0)
    rows[0] = rows[1:].mean(axis=0) + deviations * rows[1:].std(axis=0) * sign
    layer = batchnorm.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    want = rows.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), want, rtol=1e-5, atol=0)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(),
        rows.astype(np.float64).mean(axis=0),
        rtol=0,
        atol=1e-6 * std.max() * deviations,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_variance_of_large_mean_float32_data(case):
    shape, axis, virtual_batch_size, masked = CASES[case]
    x = _large_mean_data(shape, axis, seed=len(case))
    mask = None
    if masked:
        positions = tuple(1 if i == axis % len(shape) else s for i, s in enumerate(shape))
        mask = np.random.default_rng(1).random(positions) < 0.75
    groups = shape[0] // virtual_batch_size if virtual_batch_size else 1
    layer = batchnorm.BatchNormalization(
        axis=axis, momentum=0.0, virtual_batch_size=virtual_batch_size
    )
    layer(x, training=True, mask=mask)  # momentum 0: the moving statistics are the batch's
    mean, variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()

    want_mean, want_variance, valid_rows = _reference(x, axis % x.ndim, mask, groups)
    # The layer keeps float32 weights: the bound holds up to their own rounding.
    np.testing.assert_allclose(variance, want_variance, rtol=1e-5, atol=0)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=0)

    # The naive formula in float64 on the same values misses the bound by orders of magnitude.
    if groups == 1:
        naive = (valid_rows**2).mean(axis=0) - valid_rows.mean(axis=0) ** 2
        assert np.max(np.abs(naive - want_variance) / want_variance) > 1e-3


# ---- outputs at large means ---------------------------------------------------------------------

OUTPUT_ATOL = 1e-4


def _feature_axes(ndim: int, axis: int | list[int]) -> list[int]:
    return sorted(a % ndim for a in (axis if isinstance(axis, list) else [axis]))


def _large_mean_pair(shape, axis, ratio, dtype, seed):
    """x = mean + randn with per-feature means of magnitude ratio / 2 to ratio (random signs),
    and a standard normal dy: unit-variance outputs, so errors compare with absolute bounds."""
    rng = np.random.default_rng(seed)
    feature_shape = [1] * len(shape)
    for a in _feature_axes(len(shape), axis):
        feature_shape[a] = shape[a]
    means = ratio * rng.uniform(0.5, 1.0, feature_shape) * rng.choice([-1.0, 1.0], feature_shape)
    x = (means + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, means


def _large_mean_mask(shape, axis, seed):
    """A random 75% mask over the positions: full rank, size 1 on the feature axes."""
    features = _feature_axes(len(shape), axis)
    positions = tuple(1 if i in features else s for i, s in enumerate(shape))
    return np.random.default_rng(seed).random(positions) < 0.75


def _nhwc_memory(a):  # the values of an NCHW array, stored channels-last
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _every_other(a):  # the values at stride 2 along the last axis
    return np.repeat(a, 2, axis=-1)[..., ::2]


def _reversed(a):  # the values seen through a negative batch stride
    return np.ascontiguousarray(a[::-1])[::-1]


# name: (shape, axis, layer options, memory view, masked). With two or more threads "nchw" runs
# the fused plane passes (many feature blocks) and "nchw_few_features" the separate ones (a
# single block); tests/test_determinism.py checks that both compute the same bits.
OUTPUT_CASES = {
    "dense": ((4096, 8), -1, {}, None, False),
    "dense_ghost8": ((4096, 8), -1, {"virtual_batch_size": 8}, None, False),
    "dense_ghost8_mask": ((4096, 8), -1, {"virtual_batch_size": 8}, None, True),
    "dense_renorm_ghost8": ((4096, 8), -1, {"virtual_batch_size": 8, "renorm": True}, None, False),
    "dense_adjustment": ((4096, 8), -1, {"adjustment": True}, None, False),
    "dense_reversed": ((4096, 8), -1, {}, _reversed, False),
    "nhwc": ((16, 16, 16, 8), -1, {}, None, False),
    "nhwc_mask": ((16, 16, 16, 8), -1, {}, None, True),
    "nchw": ((4, 16, 64, 64), 1, {}, None, False),
    "nchw_ghost8_mask": ((16, 16, 32, 32), 1, {"virtual_batch_size": 8}, None, True),
    "nchw_renorm": ((4, 16, 64, 64), 1, {"renorm": True}, None, False),
    "nchw_few_features": ((256, 8, 4, 4), 1, {}, None, False),
    "nchw_few_features_ghost8_mask": ((256, 8, 4, 4), 1, {"virtual_batch_size": 8}, None, True),
    "nchw_channels_last_memory": ((16, 8, 16, 16), 1, {}, _nhwc_memory, False),
    "nchw_strided": ((16, 8, 16, 16), 1, {}, _every_other, False),
    "axis_list": ((64, 8, 4, 8), [1, 3], {}, None, False),
}


def _large_mean_layers(x, axis, options, means, seed, dtype="float32"):
    """The layer and the float64 reference with the same weights; renorm's statistics sit near
    the batch's, so r and d stay moderate and the outputs unit-variance."""
    options = dict(options)
    config = {"axis": axis, "momentum": 0.0}
    if options.pop("renorm", False):
        config.update(renorm=True, renorm_clipping={"rmin": 0.5, "rmax": 2.0, "dmax": 2.0})
    if options.pop("adjustment", False):
        rng = np.random.default_rng(seed + 1)
        features = x.shape[axis]
        scale, bias = rng.uniform(0.8, 1.2, features), rng.normal(0.0, 0.3, features)
        config["adjustment"] = lambda shape: (scale, bias)
    config.update(options)
    layer = batchnorm.BatchNormalization(dtype=dtype, **config)
    layer.build(x.shape)
    rng = np.random.default_rng(seed)
    weights = {}
    for w in layer.weights:
        if w.name == "gamma":
            weights[w.name] = rng.uniform(0.9, 1.1, w.shape)
        elif w.name == "beta":
            weights[w.name] = rng.normal(0.0, 0.5, w.shape)
        elif w.name in ("moving_mean", "renorm_mean"):
            weights[w.name] = np.reshape(means, w.shape) + 0.5
        else:
            weights[w.name] = np.full(w.shape, 1.25)
    layer.set_weights([weights[w.name] for w in layer.weights])
    reference = ReferenceBN(**config)
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())  # the layer's float32 values
    return layer, reference


def _max_error(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


@pytest.mark.parametrize("ratio", [1e4, 1e6], ids=["1e4", "1e6"])
@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_outputs_of_large_mean_float32_data(case, ratio):
    shape, axis, options, view, masked = OUTPUT_CASES[case]
    seed = len(case)
    x, dy, means = _large_mean_pair(shape, axis, ratio, np.float32, seed)
    if view is not None:
        x, dy = view(x), view(dy)
    mask = _large_mean_mask(shape, axis, seed) if masked else None
    layer, reference = _large_mean_layers(x, axis, options, means, seed)

    y = layer(x, training=True, mask=mask)
    y_want = reference.forward(x.astype(np.float64), training=True, mask=mask)
    assert _max_error(y, y_want) <= OUTPUT_ATOL, "training y"
    dx = layer.backward(dy)
    dx_want, dgamma_want, dbeta_want = reference.backward(dy.astype(np.float64))
    assert _max_error(dx, dx_want) <= OUTPUT_ATOL, "training dx"
    for name, want in (("gamma", dgamma_want), ("beta", dbeta_want)):
        got = np.asarray(layer.gradients[name]).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    # Inference subtracts the moving mean, itself a float32 value near the data: exact already.
    y = layer(x, training=False)
    reference.set_weights(layer.get_weights())
    assert _max_error(y, reference.forward(x.astype(np.float64))) <= OUTPUT_ATOL, "inference y"
    dx_want, _, _ = reference.backward(dy.astype(np.float64))
    assert _max_error(layer.backward(dy), dx_want) <= OUTPUT_ATOL, "inference dx"


def test_outputs_of_large_mean_float64_data():
    x, dy, means = _large_mean_pair((4096, 8), -1, 1e6, np.float64, seed=3)
    options = {"virtual_batch_size": 8}
    layer, reference = _large_mean_layers(x, -1, options, means, seed=3, dtype="float64")
    assert _max_error(layer(x, training=True), reference.forward(x, training=True)) <= 1e-8
    assert _max_error(layer.backward(dy), reference.backward(dy)[0]) <= 1e-8


def _within_one_rounding(got, want, dtype) -> bool:
    """|got - want| at most half a step of `dtype` at the larger of the two (what rounding the
    float64 result to dtype may cost), plus a few float32 roundings of the computation."""
    got = np.asarray(got, np.float64)
    larger = np.maximum(np.abs(got), np.abs(want))
    step = np.spacing(larger.astype(dtype)).astype(np.float64)
    slack = 4 * np.finfo(np.float32).eps * (1.0 + larger)
    return bool(np.all(np.abs(got - want) <= 0.5 * step + slack))


@pytest.mark.parametrize(
    "dtype,ratio", [(np.float16, 1e3), ("bfloat16", 1e2)], ids=["float16", "bfloat16"]
)
@pytest.mark.parametrize("case", ["dense_ghost8", "nchw", "nchw_few_features_ghost8_mask"])
def test_outputs_of_large_mean_16bit_data(case, dtype, ratio):
    """16-bit data carries about 3 (bfloat16: 2) significant digits and gets 16-bit outputs, so
    what counts is that they are the float64 result correctly rounded; the mean/std tested is as
    large as leaves the data some spread (at ~2^11, bfloat16 2^8, its steps exceed std)."""
    if dtype == "bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    shape, axis, options, _, masked = OUTPUT_CASES[case]
    seed = len(case)
    x, dy, means = _large_mean_pair(shape, axis, ratio, dtype, seed)
    mask = _large_mean_mask(shape, axis, seed) if masked else None
    layer, reference = _large_mean_layers(x, axis, options, means, seed)
    y = layer(x, training=True, mask=mask)
    assert y.dtype == dtype
    y_want = reference.forward(x.astype(np.float64), training=True, mask=mask)
    assert _within_one_rounding(y, y_want, dtype), _max_error(y, y_want)
    dx = layer.backward(dy)
    dx_want = reference.backward(dy.astype(np.float64))[0]
    assert _within_one_rounding(dx, dx_want, dtype), _max_error(dx, dx_want)
