"""Zero-copy: strided float inputs are read where they lie. NumPy reports its allocations to
tracemalloc, so the peak of a call shows whether anything of the input's size besides the
output was allocated."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

import batchnorm


def peak_allocation(fn: Any) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start


@pytest.mark.parametrize(
    "view",
    [lambda a: a, lambda a: a.transpose(0, 2, 3, 1), lambda a: a[:, :, 1:, ::2], lambda a: a.T],
    ids=["contiguous", "transposed", "sliced", "reversed-axes"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_input_copy(view: Any, dtype: Any) -> None:
    base = np.random.default_rng(0).normal(size=(16, 32, 32, 32)).astype(dtype)
    x = view(base)
    layer = batchnorm.BatchNormalization(axis=-1, dtype=np.dtype(dtype).name)
    layer(x, training=True)  # build outside the measurement
    out_bytes = x.size * x.itemsize
    slack = out_bytes // 8
    assert peak_allocation(lambda: layer(x, training=True)) < out_bytes + slack
    assert peak_allocation(lambda: layer(x)) < out_bytes + slack
    y = np.empty_like(x)
    assert peak_allocation(lambda: layer(x, training=True, out=y)) < slack
    dy = np.ones_like(x)
    assert peak_allocation(lambda: layer.backward(dy)) < out_bytes + slack
