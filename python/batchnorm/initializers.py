"""Keras-style weight initializers returning NumPy arrays.

Names, constructor arguments, defaults, configs and the fan/scale arithmetic follow Keras 3.
Random initializers draw from `np.random.default_rng(seed)`: the distributions are Keras', the
random streams are not (the same seed gives different numbers than Keras). As in Keras 3, an
initializer gives the same values on every call: a seeded one uses its seed, an unseeded one
draws a seed once at construction (its config still says `seed: None`).

`serialize` writes plain named functions as their name (tf-keras 2 style) and refuses lambdas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Union

import numpy as np

from ._registry import Configurable, Registry

Shape = Union[int, tuple[int, ...], list[int]]

# sqrt(scale)/this is the stddev of the untruncated normal whose 2-sigma truncation has
# standard deviation sqrt(scale) (Keras' VarianceScaling constant).
_TRUNCATED_STD_FACTOR = 0.87962566103423978


class Initializer(Configurable):
    """Base class: `init(shape, dtype) -> np.ndarray`."""

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")


_REGISTRY = Registry("initializer", "keras.initializers", Initializer)


def _shape(shape: Shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(d) for d in shape)


def _dtype(dtype: Any, need_float: bool = False) -> np.dtype:
    try:
        result = np.dtype("float32" if dtype is None else dtype)
    except TypeError as exc:
        raise TypeError(
            f"dtype {dtype!r} is not a NumPy dtype (16-bit layers keep float32 weights)"
        ) from exc
    if need_float and result.kind != "f":
        raise ValueError(f"random initializers need a floating dtype, got {result}")
    return result


@_REGISTRY.register("zeros", "zero")
class Zeros(Initializer):
    """All zeros."""

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        return np.zeros(_shape(shape), dtype=_dtype(dtype))


@_REGISTRY.register("ones", "one")
class Ones(Initializer):
    """All ones."""

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        return np.ones(_shape(shape), dtype=_dtype(dtype))


@_REGISTRY.register("constant")
class Constant(Initializer):
    """A constant value (a scalar, or an array broadcastable to the shape)."""

    def __init__(self, value: Any = 0.0) -> None:
        self.value = value

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        dt = _dtype(dtype)
        return np.array(np.broadcast_to(np.asarray(self.value, dtype=dt), _shape(shape)))

    def get_config(self) -> dict[str, Any]:
        value = self.value
        return {"value": value.tolist() if hasattr(value, "tolist") else value}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Constant:
        value = config.get("value", 0.0)
        # Keras 3 serializes array values as {"class_name": "__numpy__", "config": {...}}.
        if isinstance(value, Mapping) and isinstance(value.get("config"), Mapping):
            value = np.asarray(value["config"].get("value"))
        extra = set(config) - {"value"}
        if extra:
            raise TypeError(f"unexpected config keys {sorted(extra)}")
        return cls(value)


def _check_seed(seed: Any) -> int | None:
    # Keras 3 may store a serialized SeedGenerator ({"config": {"seed": n}}); keep its int.
    if isinstance(seed, Mapping) and isinstance(seed.get("config"), Mapping):
        seed = seed["config"].get("seed")
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        return None if seed is None else int(seed)
    raise ValueError(f"`seed` must be an integer or None, got {seed!r}")


class _RandomInitializer(Initializer):
    """Shared seed handling: the config keeps the seed as given; calls repeat their values."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = _check_seed(seed)
        self._draw_seed = self.seed if self.seed is not None else np.random.SeedSequence().entropy

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(self._draw_seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


def _truncated_standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Values beyond two standard deviations are redrawn, as Keras/TF define truncation.
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out


@_REGISTRY.register("random_normal", "normal")
class RandomNormal(_RandomInitializer):
    """Normal distribution N(mean, stddev²)."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        self.mean = mean
        self.stddev = stddev
        super().__init__(seed)

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        dt = _dtype(dtype, need_float=True)
        values = self._rng().normal(self.mean, self.stddev, _shape(shape))
        return values.astype(dt)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


@_REGISTRY.register("random_uniform", "uniform")
class RandomUniform(_RandomInitializer):
    """Uniform distribution on [minval, maxval)."""

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None):
        self.minval = minval
        self.maxval = maxval
        super().__init__(seed)

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        dt = _dtype(dtype, need_float=True)
        values = self._rng().uniform(self.minval, self.maxval, _shape(shape))
        return values.astype(dt)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


@_REGISTRY.register("truncated_normal")
class TruncatedNormal(_RandomInitializer):
    """Normal N(mean, stddev²) with draws beyond two stddev redrawn."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        self.mean = mean
        self.stddev = stddev
        super().__init__(seed)

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        dt = _dtype(dtype, need_float=True)
        values = self.mean + self.stddev * _truncated_standard_normal(self._rng(), _shape(shape))
        return values.astype(dt)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


def compute_fans(shape: Shape) -> tuple[int, int]:
    """(fan_in, fan_out) as Keras computes them (conv kernels: (..., in_depth, out_depth))."""
    dims = _shape(shape)
    if len(dims) == 0:
        return 1, 1
    if len(dims) == 1:
        return dims[0], dims[0]
    if len(dims) == 2:
        return dims[0], dims[1]
    receptive_field = math.prod(dims[:-2])
    return dims[-2] * receptive_field, dims[-1] * receptive_field


_MODES = ("fan_in", "fan_out", "fan_avg")
_DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")


@_REGISTRY.register("variance_scaling")
class VarianceScaling(_RandomInitializer):
    """Scale-aware init: stddev (or uniform limit) from `scale` / fan (Keras formulas)."""

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
    ) -> None:
        if not scale > 0.0:
            raise ValueError(f"`scale` must be a positive float, got {scale!r}")
        if mode not in _MODES:
            raise ValueError(f"Invalid `mode` {mode!r}; use one of {_MODES}")
        distribution = str(distribution).lower()
        if distribution == "normal":  # Keras' legacy spelling of truncated_normal
            distribution = "truncated_normal"
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"Invalid `distribution` {distribution!r}; use one of {_DISTRIBUTIONS}"
            )
        self.scale = scale
        self.mode = mode
        self.distribution = distribution
        super().__init__(seed)

    def __call__(self, shape: Shape, dtype: Any = "float32") -> np.ndarray:
        dt = _dtype(dtype, need_float=True)
        dims = _shape(shape)
        fan_in, fan_out = compute_fans(dims)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        scale = self.scale / max(1.0, fan)
        rng = self._rng()
        if self.distribution == "truncated_normal":
            values = (
                math.sqrt(scale) / _TRUNCATED_STD_FACTOR * _truncated_standard_normal(rng, dims)
            )
        elif self.distribution == "untruncated_normal":
            values = rng.normal(0.0, math.sqrt(scale), dims)
        else:
            limit = math.sqrt(3.0 * scale)
            values = rng.uniform(-limit, limit, dims)
        return values.astype(dt)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution,
        }


class _FixedVarianceScaling(VarianceScaling):
    """The named VarianceScaling presets: only `seed` is configurable."""

    _preset: tuple[float, str, str] = (1.0, "fan_in", "truncated_normal")

    def __init__(self, seed: int | None = None) -> None:
        scale, mode, distribution = self._preset
        super().__init__(scale=scale, mode=mode, distribution=distribution, seed=seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


@_REGISTRY.register("glorot_uniform")
class GlorotUniform(_FixedVarianceScaling):
    """Uniform on ±sqrt(6 / (fan_in + fan_out))."""

    _preset = (1.0, "fan_avg", "uniform")


@_REGISTRY.register("glorot_normal")
class GlorotNormal(_FixedVarianceScaling):
    """Truncated normal, stddev sqrt(2 / (fan_in + fan_out))."""

    _preset = (1.0, "fan_avg", "truncated_normal")


@_REGISTRY.register("he_uniform")
class HeUniform(_FixedVarianceScaling):
    """Uniform on ±sqrt(6 / fan_in)."""

    _preset = (2.0, "fan_in", "uniform")


@_REGISTRY.register("he_normal")
class HeNormal(_FixedVarianceScaling):
    """Truncated normal, stddev sqrt(2 / fan_in)."""

    _preset = (2.0, "fan_in", "truncated_normal")


@_REGISTRY.register("lecun_uniform")
class LecunUniform(_FixedVarianceScaling):
    """Uniform on ±sqrt(3 / fan_in)."""

    _preset = (1.0, "fan_in", "uniform")


@_REGISTRY.register("lecun_normal")
class LecunNormal(_FixedVarianceScaling):
    """Truncated normal, stddev sqrt(1 / fan_in)."""

    _preset = (1.0, "fan_in", "truncated_normal")


def get(identifier: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Resolve None, a name, a config dict, an Initializer or a callable `f(shape, dtype)`."""
    return _REGISTRY.get(identifier, custom_objects)


def serialize(initializer: Any) -> dict[str, Any] | str | None:
    """Keras 3 config dict (`module`, `class_name`, `config`, `registered_name`)."""
    return _REGISTRY.serialize(initializer)


def deserialize(config: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Rebuild an initializer from a Keras 3 / tf-keras 2 config dict or a name."""
    return _REGISTRY.deserialize(config, custom_objects)


__all__ = [
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "compute_fans",
    "deserialize",
    "get",
    "serialize",
]
