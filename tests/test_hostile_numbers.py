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
