"""A user's training script, checked by `mypy --strict` in tests/test_package.py: the public API is
typed precisely enough that it needs no casts (and a misspelt weight fails the check)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import batchnorm
from batchnorm import functional as F


def train(x: npt.NDArray[np.float32], steps: int) -> list[npt.NDArray[np.float32]]:
    layer = batchnorm.BatchNormalization(axis=1, momentum=0.9, gamma_regularizer="l2")
    for _ in range(steps):
        y: npt.NDArray[np.float32] = layer(x, training=True)
        dx: npt.NDArray[np.float32] = layer.backward(np.ones_like(y))
        assert dx.shape == x.shape
        layer.apply_gradients(0.01)
    mean: batchnorm.Variable = layer.moving_mean
    gamma = layer.gamma
    if gamma is not None:  # None with scale=False
        print(gamma.numpy().sum(), mean.numpy().sum(), layer.losses)
    y_eval = layer([[1.0, 2.0], [3.0, 4.0]] if x.ndim == 2 else x.tolist())
    print(y_eval.shape, layer.get_config()["momentum"])
    return layer.get_weights()


def stateless(x: npt.NDArray[np.float64]) -> None:
    options = F.Options(axis=-1, momentum=0.9)
    weights = F.initial_weights(options, x.shape, dtype="float64")
    y, context = F.forward(x, weights, options, training=True)
    dx, dgamma, dbeta = F.backward(np.ones_like(x), context)
    print(y.shape, dx.shape, dgamma, dbeta)


if __name__ == "__main__":
    train(np.random.default_rng(0).normal(size=(8, 3, 4)).astype(np.float32), 2)
    stateless(np.random.default_rng(1).normal(size=(8, 3)))
