"""SPEC section 9: float32 data whose mean is 1e6 times its spread still gets its batch variance to
1e-5 relative of a float64 computation on the same float32 values, in every layout the kernels
specialize (channels-last rows, NCHW planes with long and short runs, dense) and with masks and
ghost batches. The one-pass formula E[x^2] - E[x]^2 fails this even in float64 (checked too, so
the data is known to be hard enough)."""

from __future__ import annotations

import numpy as np
import pytest

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
