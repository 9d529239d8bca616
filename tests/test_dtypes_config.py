"""16-bit data and dtype policies, the config round trip, and layer bookkeeping
(weights, trainable switching, synchronized in one process)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import batchnorm

from reference import ReferenceBN

BN = batchnorm.BatchNormalization
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("axis,shape", [(-1, (6, 5, 4)), (1, (6, 4, 5))])
def test_sixteen_bit_inputs(dtype: Any, axis: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 50 + 3e3).astype(dtype)  # near 3e3: x^2 would overflow float16
    dy = rng.normal(size=shape).astype(dtype)
    layer = BN(axis=axis)
    ref = ReferenceBN(axis=axis)
    y = layer(x, training=True)
    ref.build(shape)
    y_ref = ref.forward(x.astype(np.float64), training=True)
    assert y.dtype == dtype  # 16-bit inputs keep their dtype; statistics in float32/float64
    tolerance = 1e-2 if dtype == np.float16 else 2e-2
    np.testing.assert_allclose(y.astype(np.float64), y_ref, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref.moving_variance, rtol=1e-4)
    dx = layer.backward(dy)
    dx_ref, dgamma_ref, _ = ref.backward(dy.astype(np.float64))
    scale = np.abs(dx_ref).max()
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, atol=tolerance * scale)
    assert layer.gradients["gamma"].dtype == np.float32
    np.testing.assert_allclose(layer.gradients["gamma"], dgamma_ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    "policy,input_dtype,output_dtype",
    [
        ("float32", np.float64, np.float32),
        ("float32", np.float16, np.float16),
        ("float64", np.float32, np.float64),
        ("mixed_float16", np.float32, np.float16),
        ("mixed_bfloat16", np.float32, BF16),
        ("float16", np.float32, np.float16),
        ({"class_name": "Policy", "config": {"name": "mixed_float16"}}, np.float32, np.float16),
    ],
)
def test_policies(policy: Any, input_dtype: Any, output_dtype: Any) -> None:
    layer = BN(dtype=policy)
    y = layer(np.ones((4, 3), input_dtype), training=True)
    assert y.dtype == output_dtype
    expected = "float64" if policy == "float64" else "float32"
    assert all(w.dtype == expected for w in layer.weights)


def test_config_round_trip_after_build() -> None:
    layer = BN(
        axis=[1, 3],
        momentum=0.9,
        epsilon=1e-4,
        center=False,
        renorm=True,
        renorm_clipping={"rmax": 2.0},
        gamma_initializer={"class_name": "Constant", "config": {"value": 0.5}},
        gamma_regularizer="l2",
        gamma_constraint="non_neg",
        name="bn_x",
        dtype="float64",
    )
    layer(np.ones((2, 3, 4, 5)), training=True)
    config = layer.get_config()
    json.dumps(config)  # plain JSON values
    clone = BN.from_config(config)
    assert clone.get_config() == config
    clone.build((2, 3, 4, 5))
    assert [w.shape for w in clone.weights] == [w.shape for w in layer.weights]
    np.testing.assert_array_equal(clone.gamma.numpy(), np.full((1, 3, 1, 5), 0.5))


def test_keras_configs_load() -> None:
    path = pathlib.Path(__file__).parent / "keras_reference" / "configs.json"
    for name, config in json.loads(path.read_text()).items():
        layer = BN.from_config(config)
        assert BN.from_config(layer.get_config()).get_config() == layer.get_config(), name


def test_adjustment_is_not_serialized() -> None:
    layer = BN(adjustment=lambda shape: (1.0, 0.0))
    with pytest.warns(UserWarning, match="adjustment"):
        assert "adjustment" not in layer.get_config()


def test_trainable_switch_after_build() -> None:
    layer = BN(gamma_regularizer="l2")
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    layer(x, training=True)
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    layer.trainable = False
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 4
    assert layer.losses == []
    before = layer.get_weights()
    y = layer(x, training=True)  # frozen: inference, nothing updated
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y, layer(x, training=False))
    layer.trainable = True
    layer(x, training=True)
    assert not np.array_equal(layer.moving_mean.numpy(), before[2])


def test_weight_objects() -> None:
    layer = BN(renorm=True, name="bn")
    layer.build((None, 3))
    assert [w.name for w in layer.weights] == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    assert layer.weights[0].path == "bn/gamma"
    np.testing.assert_array_equal(np.asarray(layer.moving_variance), np.ones(3))
    assert layer.compute_output_shape((None, 3)) == (None, 3)


def test_synchronized_single_process_matches_unsynchronized() -> None:
    x = np.random.default_rng(2).normal(size=(8, 3, 4)).astype(np.float32)
    a, b = BN(axis=1), BN(axis=1, synchronized=True)
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))
    np.testing.assert_array_equal(a.get_weights(), b.get_weights())


@pytest.mark.parametrize("fused", [None, True, False])
def test_fused_changes_nothing(fused: Any) -> None:
    x = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    reference = BN()(x, training=True)
    np.testing.assert_array_equal(BN(fused=fused)(x, training=True), reference)


def test_float16_near_its_maximum_does_not_overflow() -> None:
    rng = np.random.default_rng(5)
    x = (6.0e4 + rng.normal(size=(64, 3)) * 500).astype(np.float16)
    layer = BN()
    y = layer(x, training=True)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float64), expected, atol=1e-2)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.99 + 0.01 * x64.var(0), rtol=1e-4)
