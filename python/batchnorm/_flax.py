"""The Flax NNX module of `batchnorm.jax` (imported on first use of
`batchnorm.jax.BatchNormalization`, so that `batchnorm.jax` itself needs JAX only)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import functional as F
from .jax import batch_norm
from .layer import BatchNormalization as _KerasLayer
from .layer import copy_for_module

_UNSUPPORTED = ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint")


class BatchNormalization(nnx.Module):
    """Keras' BatchNormalization as a Flax NNX module, computed by `batchnorm.jax.batch_norm`.

    `num_features` is the feature shape: an int for one feature axis, a tuple for several (their
    sizes in axis order). Every other argument is Keras' (see `batchnorm.BatchNormalization`),
    with Keras' defaults — momentum 0.99, epsilon 1e-3, axis -1 — and Keras' initializers.

    `gamma` and `beta` are `nnx.Param`s (absent with scale=False/center=False); `moving_mean`,
    `moving_variance` and with renorm `moving_stddev`, `renorm_mean`, `renorm_stddev` are
    `nnx.BatchStat`s; each is a flat vector of C values. A call normalizes with the batch
    statistics and updates the moving ones unless `use_running_average` is True (set by
    `model.eval()`, cleared by `model.train()`, or given per call) or the layer is frozen
    (`trainable=False`, Keras' inference mode for frozen layers). `route` is `batch_norm`'s.

    Keras' regularizers and constraints are not applied by this module (an optax transform or a
    loss term does that in JAX): passing one is an error rather than silently ignored."""

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool = False,
        param_dtype: Any = jnp.float32,
        route: str = "auto",
        **keras_arguments: Any,
    ) -> None:
        given = [name for name in _UNSUPPORTED if keras_arguments.get(name) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)}: not applied by the Flax module; add the penalty to the loss "
                "or constrain the parameters in the optimizer (optax) instead"
            )
        if keras_arguments.get("synchronized"):
            raise ValueError(
                "synchronized=True is not supported by batchnorm.jax (statistics are per call)"
            )
        if keras_arguments.get("adjustment") is not None:
            raise ValueError(
                "adjustment: pass the (scale, bias) pair per call (module(x, adjustment=...))"
            )
        keras = _KerasLayer(**keras_arguments)
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(
                f"num_features must be a positive int or a tuple of them, got {num_features!r}"
            )
        keras.build(keras._options.input_shape_for(shape))
        # Static attributes (plain, hashable values): nnx.jit keys its cache on them.
        self.options_key = keras._options.json
        self.keras_config = json.dumps(keras.get_config())
        self.feature_shape = tuple(keras._feature_shape)
        self.weight_shape = tuple(keras._param_shape)
        self.names = tuple(keras._options.weight_names())
        self.use_running_average = use_running_average
        self.route = route
        self.trainable = keras.trainable
        for name, value in zip(self.names, keras.get_weights()):
            kind = nnx.Param if name in ("gamma", "beta") else nnx.BatchStat
            setattr(self, name, kind(jnp.asarray(value.reshape(-1), dtype=param_dtype)))

    @property
    def options(self) -> F.Options:
        """The validated Keras options (axis, momentum, epsilon, renorm, ...)."""
        return F.Options.from_json(self.options_key)

    def __call__(
        self,
        x: Any,
        mask: Any = None,
        *,
        use_running_average: bool | None = None,
        adjustment: tuple[Any, Any] | None = None,
    ) -> Any:
        """Normalizes x; `mask` selects the positions the batch statistics use (Keras' rank - 1
        form, or x's rank with sizes 1 where it broadcasts); `adjustment` is Keras' (scale,
        bias) pair of per-feature vectors for this call."""
        frozen = self.use_running_average if use_running_average is None else use_running_average
        training = not frozen and self.trainable
        params = {
            name: getattr(self, name)[...] for name in ("gamma", "beta") if name in self.names
        }
        moving = [name for name in self.names if name not in ("gamma", "beta")]
        state = {name: getattr(self, name)[...] for name in moving}
        y, new_state = batch_norm(
            x,
            params,
            state,
            training=training,
            mask=mask,
            adjustment=adjustment,
            options=self.options,
            route=self.route,
        )
        if training:
            for name in moving:
                getattr(self, name)[...] = new_state[name]
        return y

    def get_config(self) -> dict[str, Any]:
        """Keras' layer config (loadable by Keras and by `from_keras`)."""
        return json.loads(self.keras_config)

    def get_weights(self) -> list[np.ndarray]:
        """The weights in Keras' order and shapes (host NumPy copies)."""
        return [
            np.array(getattr(self, name)[...]).reshape(self.weight_shape) for name in self.names
        ]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets every weight from Keras' list (`layer.get_weights()` order; any Keras layout of
        the same size). Everything is checked before anything changes."""
        weights = list(weights)
        if len(weights) != len(self.names):
            raise ValueError(
                f"expected {len(self.names)} weights ({', '.join(self.names)}), got {len(weights)}"
            )
        features = int(np.prod(self.feature_shape))
        values = [np.asarray(w) for w in weights]
        for name, value in zip(self.names, values):
            if value.size != features:
                raise ValueError(f"{name}: expected {features} values, got shape {value.shape}")
        for name, value in zip(self.names, values):
            variable = getattr(self, name)
            variable[...] = jnp.asarray(value.reshape(-1), dtype=variable[...].dtype)

    @classmethod
    def from_keras(
        cls,
        config: Mapping[str, Any] | _KerasLayer,
        weights: Sequence[Any] | None = None,
        **module_arguments: Any,
    ) -> BatchNormalization:
        """A module from a Keras BatchNormalization: a tf.keras 2 or Keras 3 layer config (the
        layer's `get_config()`, or a model config's `{"class_name": ..., "config": ...}` entry)
        or a `batchnorm.BatchNormalization`, with Keras' weight list (`layer.get_weights()`; a
        built batchnorm layer gives its own when `weights` is None). The feature shape comes
        from the config's build shape, or else from the weights (one feature axis)."""
        keras, weights = copy_for_module(config, weights)
        if isinstance(config, _KerasLayer) and config.built:
            keras.build(config._build_input_shape)
        if keras.built:
            num_features: Any = tuple(keras._feature_shape)
        elif weights is not None and len(weights) > 0:
            num_features = int(np.asarray(weights[0]).size)
        else:
            raise ValueError(
                "from_keras needs the feature shape: a config with a build shape, or weights"
            )
        module = cls(num_features, **module_arguments, **keras.get_config())
        if weights is not None:
            module.set_weights(weights)
        return module
