"""The error catalogue: every invalid argument or combination raises ValueError/TypeError naming
the problem, before any state changes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import batchnorm

BN = batchnorm.BatchNormalization


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"axis": 1.5}, TypeError, "axis"),
        ({"axis": [1, "a"]}, TypeError, "axis"),
        ({"axis": []}, TypeError, "axis"),
        ({"axis": True}, TypeError, "axis"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": "high"}, TypeError, "momentum"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": -1e-3}, ValueError, "epsilon"),
        ({"renorm_momentum": 2.0}, ValueError, "renorm_momentum"),
        ({"renorm_clipping": {"rmax": 1.0, "bogus": 1}}, ValueError, "bogus"),
        ({"renorm_clipping": {"rmax": 0.5, "rmin": 1.0}}, ValueError, "rmax"),
        ({"renorm_clipping": {"dmax": -1.0}}, ValueError, "dmax"),
        ({"renorm_clipping": [1, 2]}, TypeError, "renorm_clipping"),
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
        ({"virtual_batch_size": 2.5}, TypeError, "virtual_batch_size"),
        ({"virtual_batch_size": 2, "adjustment": lambda s: (1, 0)}, ValueError, "adjustment"),
        ({"virtual_batch_size": 2, "axis": 0}, ValueError, "axis 0"),
        ({"adjustment": 3}, TypeError, "adjustment"),
        ({"fused": "yes"}, TypeError, "fused"),
        ({"synchronized": "yes"}, TypeError, "synchronized"),
        ({"dtype": "int32"}, ValueError, "dtype"),
        ({"gamma_initializer": "no_such_initializer"}, ValueError, "no_such_initializer"),
        ({"beta_regularizer": "l7"}, ValueError, "l7"),
        ({"gamma_constraint": 42}, TypeError, "42"),
        ({"name": 3}, TypeError, "name"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        BN(**kwargs)


@pytest.mark.parametrize(
    "axis,shape,words",
    [
        (3, (2, 3), "out of range"),
        (-4, (2, 3, 4), "out of range"),
        ([1, -2], (2, 3, 4), "duplicates"),
    ],
)
def test_build_errors(axis: Any, shape: tuple[int, ...], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        BN(axis=axis)(np.zeros(shape, np.float32))


def built_layer(**kwargs: Any) -> Any:
    layer = BN(axis=1, **kwargs)
    layer(np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32), training=True)
    return layer


def assert_unchanged(layer: Any, before: list[np.ndarray]) -> None:
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda layer: layer(np.zeros((4, 3), np.float32), training=True), ValueError, "rank"),
        (
            lambda layer: layer(np.zeros((4, 2, 5), np.float32), training=True),
            ValueError,
            "built for",
        ),
        (lambda layer: layer(np.zeros((4, 3, 5), complex), training=True), TypeError, "complex"),
        (lambda layer: layer(np.array([["a"] * 5] * 3 * 4).reshape(4, 3, 5)), TypeError, "dtype"),
        (lambda layer: layer(np.zeros((4, 3, 5), object)), TypeError, "dtype"),
        (
            lambda layer: layer(
                np.zeros((4, 3, 5), np.float32), training=True, mask=np.ones((4, 4))
            ),
            ValueError,
            "mask",
        ),
        (
            lambda layer: layer(
                np.zeros((4, 3, 5), np.float32), training=True, mask=np.full((4, 5), 2)
            ),
            ValueError,
            "0/1",
        ),
        (
            lambda layer: layer(
                np.zeros((4, 3, 5), np.float32), out=np.zeros((4, 3, 5), np.float64)
            ),
            ValueError,
            "out",
        ),
        (lambda layer: layer.backward(np.zeros((4, 3, 6), np.float32)), ValueError, "dy"),
        (lambda layer: layer.set_weights([np.ones(3)] * 3), ValueError, "expected 4"),
        (
            lambda layer: layer.set_weights([np.ones(3)] * 3 + [np.ones(4)]),
            ValueError,
            "moving_variance",
        ),
        (
            lambda layer: layer.set_weights([np.ones(3)] * 3 + [np.array(["a"] * 3)]),
            TypeError,
            "dtype",
        ),
    ],
)
def test_call_errors_change_nothing(call: Any, error: type, words: str) -> None:
    layer = built_layer()
    before = layer.get_weights()
    with pytest.raises(error, match=words):
        call(layer)
    assert_unchanged(layer, before)


def test_read_only_out_is_rejected() -> None:
    layer = built_layer()
    out = np.zeros((4, 3, 5), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        layer(np.zeros((4, 3, 5), np.float32), out=out)


def test_ghost_batch_size_must_divide_the_batch() -> None:
    layer = BN(virtual_batch_size=3)
    layer.build((None, 4))
    before = layer.get_weights()
    with pytest.raises(ValueError, match="multiple of virtual_batch_size"):
        layer(np.zeros((8, 4), np.float32), training=True)
    assert_unchanged(layer, before)


def test_backward_needs_a_forward_call() -> None:
    with pytest.raises(ValueError, match="forward call"):
        BN().backward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="backward"):
        BN().apply_gradients(0.1)


def test_set_weights_before_build() -> None:
    with pytest.raises(ValueError, match="build"):
        BN().set_weights([np.ones(3)] * 4)


def test_adjustment_of_wrong_shape() -> None:
    layer = BN(adjustment=lambda shape: (np.ones(4), np.zeros(3)))
    layer.build((None, 3))
    before = layer.get_weights()
    with pytest.raises(ValueError, match="adjustment scale"):
        layer(np.zeros((2, 3), np.float32), training=True)
    assert_unchanged(layer, before)
