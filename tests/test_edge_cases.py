"""Inputs at the edges that once crashed the process or gave silently wrong results: empty views
with strides, float64 data under 16-bit policies, outputs overlapping any input, empty masks
from PyTorch, and arrays that are not aligned to their item size."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import batchnorm

from reference import ReferenceBN

EMPTY_VIEWS = [
    # (base shape, slice, axis): an empty axis among others, so no layout merges it away.
    ((3, 2, 3), np.s_[:0, :, :0], 1),
    ((3, 2, 3), np.s_[:, :, :0], 1),
    ((11, 3, 3, 7, 4), np.s_[:, :, :0], [0, 3]),
    ((5, 4, 6), np.s_[:, :0], 1),
    ((4, 6, 3), np.s_[:, 1:1], -1),
    ((6, 4, 5, 3), np.s_[::-1, :, :0], -1),
]


@pytest.mark.parametrize("base,index,axis", EMPTY_VIEWS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_views_change_nothing(base: Any, index: Any, axis: Any, training: bool) -> None:
    x = np.random.default_rng(0).normal(size=base).astype(np.float32)[index]
    layer = batchnorm.BatchNormalization(axis=axis, virtual_batch_size=None)
    layer.build(x.shape)
    before = layer.get_weights()
    y = layer(x, training=training)
    assert y.shape == x.shape
    # dy an empty strided slice too, not the contiguous empty array x's shape would give.
    dy = np.ones(base, np.float32)[index]
    dx = layer.backward(dy)
    assert dx.shape == x.shape
    for key, gradient in layer.gradients.items():
        np.testing.assert_array_equal(gradient, 0.0, err_msg=key)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_empty_view_with_mask_and_ghost_batches() -> None:
    x = np.ones((8, 3, 5), np.float32)[:, :, :0]
    mask = np.ones((8, 3), bool)
    layer = batchnorm.BatchNormalization(axis=1, virtual_batch_size=4)
    y = layer(x, training=True, mask=mask)
    dx = layer.backward(np.ones((8, 3, 5), np.float32)[:, :, :0])
    assert y.shape == dx.shape == (8, 3, 0)


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "mixed_float16", "mixed_bfloat16"])
def test_float64_numpy_input_under_16_bit_policies(policy: str) -> None:
    """The NumPy fast path once compared the input dtype with None (True in NumPy) and skipped
    the cast from the second call on."""
    x = np.random.default_rng(1).normal(size=(16, 3))
    layer = batchnorm.BatchNormalization(dtype=policy)
    first = layer(x, training=True)
    second = layer(x, training=True)
    third = layer(x)
    assert first.dtype == second.dtype == third.dtype
    np.testing.assert_allclose(
        np.asarray(second, np.float32), np.asarray(first, np.float32), atol=2e-2
    )


def test_backward_out_overlapping_dy_is_refused() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    layer = batchnorm.BatchNormalization()
    layer(x, training=True)
    weights = layer.get_weights()
    buf = rng.normal(size=193).astype(np.float32)
    dy, out = buf[:-1].reshape(64, 3), buf[1:].reshape(64, 3)
    kept = buf.copy()
    with pytest.raises(ValueError, match="out: must not overlap dy"):
        layer.backward(dy, out=out)
    np.testing.assert_array_equal(buf, kept)  # nothing written
    for a, b in zip(weights, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Interleaved views share a buffer without sharing an element: accepted, and exact.
    pair = rng.normal(size=(64, 6)).astype(np.float32)
    dx = layer.backward(pair[:, ::2], out=pair[:, 1::2])
    np.testing.assert_array_equal(dx, layer.backward(np.ascontiguousarray(pair[:, ::2])))


def test_out_overlapping_the_mask_is_refused() -> None:
    x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    out = np.zeros((8, 4), np.float32)
    mask = out.view(np.bool_)[:, 0]  # (8,) booleans inside the output's buffer, read in place
    mask[...] = True
    layer = batchnorm.BatchNormalization()
    with pytest.raises(ValueError, match="out: must not overlap the mask"):
        layer(x, training=True, mask=mask, out=out)


@pytest.mark.torch
def test_torch_out_overlapping_dy_is_refused() -> None:
    import torch

    x = torch.randn(16, 3)
    layer = batchnorm.BatchNormalization()
    layer(x, training=True)
    buf = torch.randn(49)
    with pytest.raises(ValueError, match="out: must not overlap dy"):
        layer.backward(buf[:-1].reshape(16, 3), out=buf[1:].reshape(16, 3))


@pytest.mark.torch
def test_empty_torch_batch_with_mask_then_backward() -> None:
    """An empty tensor may have a null data pointer; the forward call still had a mask."""
    import torch

    layer = batchnorm.BatchNormalization()
    x = torch.zeros((0, 3))
    layer(x, training=True, mask=torch.zeros((0,), dtype=torch.bool))
    dx = layer.backward(torch.zeros((0, 3)))
    assert tuple(dx.shape) == (0, 3)
    assert set(layer.gradients) == {"gamma", "beta"}


def _misaligned(values: np.ndarray) -> np.ndarray:
    """A copy of `values` whose data starts one byte past an aligned address."""
    raw = np.zeros(values.nbytes + values.itemsize, np.uint8)
    start = 1 if raw.ctypes.data % values.itemsize == 0 else 0
    view = raw[start : start + values.nbytes].view(values.dtype).reshape(values.shape)
    view[...] = values
    assert not view.flags.aligned
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_misaligned_numpy_arrays_give_exact_results(dtype: Any) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, size=(32, 5)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    policy = {np.float16: "float16", np.float32: "float32", np.float64: "float64"}[dtype]
    plain = batchnorm.BatchNormalization(dtype=policy)
    shifted = batchnorm.BatchNormalization(dtype=policy)
    out, dx_out = _misaligned(np.zeros_like(x)), _misaligned(np.zeros_like(x))
    y = shifted(_misaligned(x), training=True, out=out)
    assert y is out
    np.testing.assert_array_equal(out, plain(x, training=True))
    dx = shifted.backward(_misaligned(dy), out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx_out, plain.backward(dy))
    np.testing.assert_array_equal(shifted(_misaligned(x)), plain(x))


def test_keras_mask_on_axis_1_matches_the_reference() -> None:
    """Keras' rank - 1 mask on (B, C, T) with axis=1 selects (sample, channel) rows."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 4, 7))
    mask = rng.random((6, 4)) > 0.4
    layer = batchnorm.BatchNormalization(axis=1, dtype="float64")
    ref = ReferenceBN(axis=1)
    np.testing.assert_allclose(
        layer(x, training=True, mask=mask), ref.forward(x, training=True, mask=mask), atol=1e-12
    )
    # Each channel counts only its own valid samples: the statistics differ from a
    # per-sample mask's.
    per_channel_mean = np.array([x[mask[:, c], c, :].mean() for c in range(4)], dtype=np.float64)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.01 * per_channel_mean, rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("mask_shape", [(6,), (6, 4, 7, 1), (6, 5)])
def test_mask_of_another_rank_or_shape_is_refused(mask_shape: tuple[int, ...]) -> None:
    layer = batchnorm.BatchNormalization(axis=1)
    x = np.ones((6, 4, 7), np.float32)
    layer.build(x.shape)
    before = layer.get_weights()
    with pytest.raises(ValueError, match="mask: shape"):
        layer(x, training=True, mask=np.ones(mask_shape, bool))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_inference_checks_only_the_mask_rank() -> None:
    """As Keras: at inference the mask is unused, so only its rank is checked."""
    layer = batchnorm.BatchNormalization(axis=1)
    x = np.random.default_rng(6).normal(size=(6, 4, 7)).astype(np.float32)
    y = layer(x)
    np.testing.assert_array_equal(layer(x, mask=np.ones((3, 9), bool)), y)
    np.testing.assert_array_equal(layer(x, training=False, mask=np.ones((6, 4, 7))), y)
    with pytest.raises(ValueError, match="rank"):
        layer(x, mask=np.ones((6,), bool))
