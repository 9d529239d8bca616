"""Hostile numbers: NaN and infinities stay within their feature (forward, backward, masks,
ghost batches, the moving statistics), float16 data near its largest value, denormal data with
a tiny epsilon, and data whose mean is 10^6 times its spread."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import batchnorm

from reference import ReferenceBN

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference meets NaN


def _pair(**options: Any) -> tuple[Any, ReferenceBN]:
    return batchnorm.BatchNormalization(**options), ReferenceBN(**options)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("renorm", [False, True])
def test_a_nan_reaches_the_moving_statistics_of_its_feature_only(bad: float, renorm: bool) -> None:
    """The variance of a feature with a NaN or an infinity was clamped to 0 (NaN > 0 is false),
    so moving_variance silently became finite while moving_mean was NaN."""
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    x[3, 2] = bad
    layer, reference = _pair(momentum=0.5, renorm=renorm)
    layer.build(x.shape)
    reference.build(x.shape)
    layer(x, training=True)
    reference.forward(x.astype(np.float64), training=True)
    for name, got, want in zip(
        layer.options.weight_names(), layer.get_weights(), reference.get_weights()
    ):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=name)
        assert np.isfinite(got[[0, 1, 3]]).all(), name
        np.testing.assert_allclose(got[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-5, err_msg=name)
        if name in ("moving_mean", "moving_variance", "renorm_mean", "renorm_stddev"):
            assert not np.isfinite(got[2]), name


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(
    "shape,axis,ghost,masked",
    [((16, 4), -1, None, False), ((16, 4), -1, 4, True), ((8, 4, 5, 5), 1, 2, True)],
)
def test_a_nan_stays_in_its_feature_forward_and_backward(
    bad: float, shape: tuple[int, ...], axis: int, ghost: Any, masked: bool
) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    index = (5,) + (2,) + (0,) * (len(shape) - 2) if axis == 1 else (5, 2)
    x[index] = bad  # feature 2, in ghost batch 5 % (16 / 4) = 1 (or 5 % 4)
    mask = rng.random(shape[:-1]) < 0.8 if masked else None
    if mask is not None:
        mask[index[:-1]] = True
    layer, reference = _pair(axis=axis, virtual_batch_size=ghost, momentum=0.5)
    y = layer(x, training=True, mask=mask)
    want_y = reference.forward(x.astype(np.float64), training=True, mask=mask)
    dy = rng.normal(size=shape).astype(np.float32)
    dx = layer.backward(dy)
    want_dx, want_dgamma, want_dbeta = reference.backward(dy.astype(np.float64))
    features = np.moveaxis(np.arange(x.size).reshape(shape), axis, -1)
    for got, want in ((y, want_y), (dx, want_dx)):
        got, want = np.moveaxis(got, axis, -1), np.moveaxis(want, axis, -1)
        other = np.ones(features.shape[-1], bool)
        other[2] = False
        # Other features: finite and right; feature 2: non-finite exactly where the reference is.
        np.testing.assert_allclose(got[..., other], want[..., other], rtol=2e-4, atol=2e-4)
        np.testing.assert_array_equal(np.isfinite(got[..., 2]), np.isfinite(want[..., 2]))
    for key, want in (("gamma", want_dgamma), ("beta", want_dbeta)):
        got = np.asarray(layer.gradients[key]).reshape(-1)
        np.testing.assert_allclose(got[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-4, atol=1e-4)
    assert not np.isfinite(layer.gradients["gamma"].reshape(-1)[2])


DENORMAL_CASES = [
    # (shape, axis): a row layout, a plane layout (fused passes) and one with ghost batches.
    ((64, 3), -1),
    ((6, 3, 8, 8), 1),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,axis", DENORMAL_CASES)
@pytest.mark.parametrize("ghost", [None, 2])
def test_denormal_data_with_a_tiny_epsilon_gives_finite_outputs(
    dtype: str, shape: tuple[int, ...], axis: int, ghost: Any
) -> None:
    """1 / sqrt(var + 1e-90) of data near 1e-40 is about 1e40, beyond float32: the scale the
    kernels multiply by overflowed and every output was infinite or NaN although |y| < 4."""
    np_dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if dtype == "bfloat16" else dtype
    rng = np.random.default_rng(2)
    x = (rng.normal(2e-40, 1e-40, shape)).astype(np_dtype)
    layer, reference = _pair(axis=axis, epsilon=1e-90, virtual_batch_size=ghost)
    y = layer(x, training=True)
    want = reference.forward(x.astype(np.float64), training=True)
    assert np.isfinite(np.asarray(y, np.float64)).all()
    # float32: the denormal differences are exact and the scale is rounded once; bfloat16 has 8
    # significant bits and the split scale rounds the intermediate once more.
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,axis", DENORMAL_CASES)
def test_inference_with_a_zero_moving_variance_and_a_tiny_epsilon(
    shape: tuple[int, ...], axis: int
) -> None:
    x = np.random.default_rng(3).normal(1e-40, 1e-40, shape).astype(np.float32)
    layer, reference = _pair(axis=axis, epsilon=1e-90)
    layer.build(shape)
    reference.build(shape)
    weights = [np.full(3, 0.5), np.full(3, 0.25), np.zeros(3), np.zeros(3)]
    layer.set_weights(weights)
    reference.set_weights(weights)
    y = layer(x)  # x * 0.5 / sqrt(1e-90) + 0.25: about 1e5
    want = reference.forward(x.astype(np.float64))
    np.testing.assert_allclose(y, want, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", DENORMAL_CASES)
def test_a_constant_feature_with_a_tiny_epsilon_gives_beta(
    shape: tuple[int, ...], axis: int
) -> None:
    """var = 0: the scale 1 / sqrt(1e-90) overflowed float32 and 0 * inf gave NaN."""
    x = np.full(shape, 3.5, np.float32)
    layer = batchnorm.BatchNormalization(axis=axis, epsilon=1e-90, beta_initializer="ones")
    y = layer(x, training=True)
    np.testing.assert_array_equal(y, 1.0)


def test_float16_near_its_largest_value() -> None:
    """Data near 65504: the statistics (float64) and the normalized outputs are exact enough,
    although x^2 and sums overflow float16 by far."""
    rng = np.random.default_rng(4)
    x = rng.uniform(60000, 65504, (256, 4)).astype(np.float16)
    x[:, 3] = -x[:, 3]
    layer, reference = _pair(momentum=0.0)
    y = layer(x, training=True)
    want = reference.forward(x.astype(np.float64), training=True)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=4e-3, atol=4e-3)
    for name, got, expected in zip(
        layer.options.weight_names(), layer.get_weights(), reference.get_weights()
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=name)
    dy = rng.normal(size=x.shape).astype(np.float16)
    dx = layer.backward(dy)
    want_dx = reference.backward(dy.astype(np.float64))[0]
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx.astype(np.float64), want_dx, rtol=4e-3, atol=4e-3 * 1e-3)
    # Inference with moving statistics of the same size: y = (x - 6e4) / 2e3, well in range.
    layer.set_weights([np.ones(4), np.zeros(4), np.full(4, 6.2e4), np.full(4, 1e6)])
    reference.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        layer(x).astype(np.float64), reference.forward(x.astype(np.float64)), rtol=4e-3, atol=4e-3
    )


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
@pytest.mark.parametrize("shape,axis", [((512, 8), -1), ((16, 8, 6, 6), 1)])
def test_mean_a_million_times_the_spread(dtype: Any, tol: float, shape: Any, axis: int) -> None:
    """|mean| / std = 1e6: variance within 1e-5 relative, y and dx within 1e-4 (float32) of a
    float64 computation on the same data (docs/numerics.md)."""
    rng = np.random.default_rng(5)
    x = (1e6 + rng.normal(size=shape)).astype(dtype)
    layer = batchnorm.BatchNormalization(axis=axis, momentum=0.0, dtype=np.dtype(dtype).name)
    reference = ReferenceBN(axis=axis, momentum=0.0)
    y = layer(x, training=True)
    want = reference.forward(x.astype(np.float64), training=True)
    np.testing.assert_allclose(y, want, atol=tol)
    variance = layer.get_weights()[3]
    np.testing.assert_allclose(variance, reference.get_weights()[3], rtol=1e-5)
    dy = rng.normal(size=shape).astype(dtype)
    np.testing.assert_allclose(
        layer.backward(dy), reference.backward(dy.astype(np.float64))[0], atol=2 * tol
    )


@pytest.mark.parametrize("shape,axis", [((64, 3), -1), ((8, 3, 40, 40), 1)])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_inference_dx_does_not_depend_on_x(shape: tuple[int, ...], axis: int, bad: float) -> None:
    """dx = dy * gamma / sqrt(moving_variance + epsilon) at inference: a NaN or infinity in x
    made dx NaN at its position (the kernels' zero slope times x - shift); dgamma of its
    feature, sum(dy * (x - moving_mean)) / std, is rightly non-finite."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=shape).astype(np.float32)
    index = (2, 1) + (5,) * (len(shape) - 2)
    x[index] = bad
    layer, reference = _pair(axis=axis)
    layer.build(shape)
    reference.build(shape)
    weights = [rng.uniform(0.5, 1.5, 3), rng.normal(size=3), rng.normal(size=3), np.full(3, 2.0)]
    layer.set_weights(weights)
    reference.set_weights(layer.get_weights())
    layer(x)
    reference.forward(x.astype(np.float64))
    dy = rng.normal(size=shape).astype(np.float32)
    dx = layer.backward(dy)
    want_dx, want_dgamma, _ = reference.backward(dy.astype(np.float64))
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6)
    dgamma = np.asarray(layer.gradients["gamma"]).reshape(-1)
    assert not np.isfinite(dgamma[1]) and np.isfinite(dgamma[[0, 2]]).all()


@pytest.mark.parametrize(
    "shape,axis", [((300, 16), -1), ((6, 16, 7, 7), 1), ((5, 41, 16), -1)], ids=str
)
def test_bfloat16_outputs_are_float32_results_rounded_to_nearest_even(
    shape: tuple[int, ...], axis: int
) -> None:
    """A mixed_bfloat16 layer computes as a float32 layer does on the same values, then rounds
    each output to bfloat16 in vector code: to nearest, ties to even, past the largest bfloat16 to
    infinity, and a NaN stays a NaN."""
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
    largest = float(ml_dtypes.finfo(bfloat16).max)
    rng = np.random.default_rng(12)
    x = rng.normal(size=shape) * 4.0
    last = np.moveaxis(x, axis, -1)  # a view: features last
    last.reshape(-1, 16)[::7] = 1.0  # times 1 + 2^-8 below: halfway between two bfloat16 values
    last[..., 1].flat[::5] = largest  # times 1 + 3 * 2^-10: finite in float32, rounds to inf
    last[..., 2].flat[::3] = -largest
    specials = [np.nan, np.inf, -np.inf, 1e-39, -0.0, 0.0, 3.0 + 2.0**-6]
    last[..., 3].flat[: len(specials)] = specials
    x16 = x.astype(bfloat16)
    dy16 = rng.normal(size=shape).astype(bfloat16)
    dy16.flat[::11] = np.nan
    scales = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-10, 1.0 + 3 * 2.0**-10, 1.5, 0.75, 3.0, 1e-3, 7.0]
    weights = [np.resize(scales, 16), np.zeros(16), np.zeros(16), np.ones(16)]  # mean 0, var 1
    # A NaN gamma whose payload fills the low half: rounding must not carry it into the sign.
    weights[0] = weights[0].astype(np.float32)
    weights[0].view(np.uint32)[15] = 0x7FFFFFFF
    layer = batchnorm.BatchNormalization(axis=axis, epsilon=1e-30, dtype="mixed_bfloat16")
    exact = batchnorm.BatchNormalization(axis=axis, epsilon=1e-30)  # scale = gamma exactly
    for each in (layer, exact):
        each.build(shape)
        each.set_weights(weights)

    def bits(a: Any) -> Any:
        return np.asarray(a).view(np.uint16)

    for name, got, want in [
        ("y", layer(x16), exact(x16.astype(np.float32))),
        ("dx", layer.backward(dy16), exact.backward(dy16.astype(np.float32))),
    ]:
        assert got.dtype == bfloat16 and want.dtype == np.float32
        expected = want.astype(bfloat16)
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan, err_msg=name)
        np.testing.assert_array_equal(bits(got)[~nan], bits(expected)[~nan], err_msg=name)
        assert (bits(got)[nan] & 0x40).all(), f"{name}: a NaN lost its quiet bit"
    want_y = exact(x16.astype(np.float32))
    ties = (want_y.view(np.uint32) & 0xFFFF) == 0x8000
    assert ties.sum() > 10, "no halfway cases: the test would not tell ties from rounding up"
    assert (np.isinf(layer(x16).astype(np.float32)) & np.isfinite(want_y)).any()
