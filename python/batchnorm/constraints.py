"""Keras-style weight constraints: projections applied to a weight after each update.

Formulas are Keras' (tf-keras 2 and Keras 3 agree), including the `1e-7` (Keras' default
`backend.epsilon()`) added to the norm in the denominators, so a zero vector stays zero and
constrained norms land slightly below their target. Norms are computed in float64 and the
result is returned in the weight's floating dtype.

Identifiers: "non_neg", "max_norm", "min_max_norm", "unit_norm" and the class names. Plain
callables `f(w) -> w'` are accepted; `serialize` writes named functions as their name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from ._registry import Configurable, Registry

# Keras' backend.epsilon() default, the fuzz factor in every norm denominator.
EPSILON = 1e-7

Axis = Union[int, Sequence[int]]


def _float_weight(w: Any) -> tuple[np.ndarray, np.dtype]:
    arr = np.asarray(w)
    out_dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float32)
    return arr.astype(np.float64), out_dtype


def _norms(w64: np.ndarray, axis: Axis) -> np.ndarray:
    ax = tuple(axis) if isinstance(axis, (list, tuple)) else axis
    return np.sqrt(np.sum(np.square(w64), axis=ax, keepdims=True))


class Constraint(Configurable):
    """Base class: `c(w) -> w'`; the base constraint leaves `w` unchanged."""

    def __call__(self, w: Any) -> np.ndarray:
        return np.asarray(w)


_REGISTRY = Registry("constraint", "keras.constraints", Constraint)


@_REGISTRY.register("non_neg")
class NonNeg(Constraint):
    """max(w, 0)."""

    def __call__(self, w: Any) -> np.ndarray:
        arr = np.asarray(w)
        return np.maximum(arr, np.zeros((), dtype=arr.dtype))


@_REGISTRY.register("max_norm")
class MaxNorm(Constraint):
    """w · clip(‖w‖, 0, max_value) / (ε + ‖w‖), norms along `axis`."""

    def __init__(self, max_value: float = 2, axis: Axis = 0) -> None:
        self.max_value = max_value
        self.axis = axis

    def __call__(self, w: Any) -> np.ndarray:
        w64, dtype = _float_weight(w)
        norms = _norms(w64, self.axis)
        desired = np.clip(norms, 0, self.max_value)
        return (w64 * (desired / (EPSILON + norms))).astype(dtype)

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, "axis": self.axis}


@_REGISTRY.register("min_max_norm")
class MinMaxNorm(Constraint):
    """w · (rate·clip(‖w‖, min, max) + (1−rate)·‖w‖) / (ε + ‖w‖), norms along `axis`."""

    def __init__(
        self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: Axis = 0
    ) -> None:
        self.min_value = min_value
        self.max_value = max_value
        self.rate = rate
        self.axis = axis

    def __call__(self, w: Any) -> np.ndarray:
        w64, dtype = _float_weight(w)
        norms = _norms(w64, self.axis)
        desired = (
            self.rate * np.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
        )
        return (w64 * (desired / (EPSILON + norms))).astype(dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": self.axis,
        }


@_REGISTRY.register("unit_norm")
class UnitNorm(Constraint):
    """w / (ε + ‖w‖), norms along `axis`."""

    def __init__(self, axis: Axis = 0) -> None:
        self.axis = axis

    def __call__(self, w: Any) -> np.ndarray:
        w64, dtype = _float_weight(w)
        return (w64 / (EPSILON + _norms(w64, self.axis))).astype(dtype)

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis}


def get(identifier: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Resolve None, a name, a config dict, a Constraint or a callable `f(w) -> w'`."""
    return _REGISTRY.get(identifier, custom_objects)


def serialize(constraint: Any) -> dict[str, Any] | str | None:
    """Keras 3 config dict (`module`, `class_name`, `config`, `registered_name`)."""
    return _REGISTRY.serialize(constraint)


def deserialize(config: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Rebuild a constraint from a Keras 3 / tf-keras 2 config dict or a name."""
    return _REGISTRY.deserialize(config, custom_objects)


__all__ = [
    "EPSILON",
    "Constraint",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "UnitNorm",
    "deserialize",
    "get",
    "serialize",
]
