"""Keras-style weight regularizers: a loss value and its gradient, in NumPy.

Values follow Keras: `L1` = l1·Σ|w|, `L2` = l2·Σw², `L1L2` = both; the gradient of |w| at 0 is
taken as 0 (sign). Losses are computed in float64 and returned as Python floats.

Identifiers: "l1" → L1(0.01), "l2" → L2(0.01), "l1l2" → L1L2(0, 0) (Keras 3's snake-case name of
the class, class defaults). "l1_l2" → L1L2(l1=0.01, l2=0.01): tf-keras 2 gives these values for
that string, and Keras 3 documents the same values but its `get("l1_l2")` actually raises
(its name table only holds "l1l2"); we accept the documented spelling with the documented
values rather than reject it. Note the class defaults differ: `L1L2()` is 0/0 (Keras 3 and
tf-keras 2 alike) while tf-keras 2's function `l1_l2()` defaulted to 0.01/0.01.

A plain callable `f(w) -> float` is accepted as a regularizer; its gradient (see `gradient`)
is then taken by central finite differences in float64, one pair of calls per weight element.
The same fallback is the default `Regularizer.gradient` for subclasses that only define
`__call__`. `serialize` writes plain named functions as their name and refuses lambdas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from ._registry import Configurable, Registry


def _as_float_array(w: Any) -> np.ndarray:
    return np.asarray(w, dtype=np.float64)


def _like(grad: np.ndarray, w: Any) -> np.ndarray:
    # Hand the gradient back in the weight's own floating dtype so an update keeps it.
    dtype = getattr(w, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind == "f":
        return grad.astype(dtype)
    return grad


def finite_difference_gradient(fn: Callable[[np.ndarray], Any], w: Any) -> np.ndarray:
    """Central-difference gradient of a scalar function of `w`, evaluated in float64."""
    base = _as_float_array(w)
    grad = np.zeros_like(base)
    flat = grad.reshape(-1)
    probe = base.copy()
    probe_flat = probe.reshape(-1)
    # cbrt(machine eps) balances truncation and rounding error for central differences.
    step0 = np.finfo(np.float64).eps ** (1.0 / 3.0)
    for i in range(probe_flat.size):
        orig = probe_flat[i]
        h = step0 * max(1.0, abs(orig))
        probe_flat[i] = orig + h
        up = float(fn(probe.copy()))
        probe_flat[i] = orig - h
        down = float(fn(probe.copy()))
        probe_flat[i] = orig
        flat[i] = (up - down) / (2.0 * h)
    return _like(grad, w)


class Regularizer(Configurable):
    """Base class: `reg(w) -> float` penalty and `reg.gradient(w)` its derivative."""

    def __call__(self, w: Any) -> float:
        return 0.0

    def gradient(self, w: Any) -> np.ndarray:
        # Subclasses without an analytic gradient still work, at finite-difference cost.
        return finite_difference_gradient(self, w)

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not implement get_config()")


_REGISTRY = Registry("regularizer", "keras.regularizers", Regularizer)


def _check_factor(value: Any, name: str) -> float:
    valid = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not valid or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(
            f"Invalid value for argument {name}: expected a non-negative float, "
            f"got {name}={value!r}"
        )
    return float(value)


@_REGISTRY.register("l1")
class L1(Regularizer):
    """l1·Σ|w|."""

    def __init__(self, l1: float | None = 0.01) -> None:
        self.l1 = _check_factor(0.01 if l1 is None else l1, "l1")

    def __call__(self, w: Any) -> float:
        return self.l1 * float(np.sum(np.abs(_as_float_array(w))))

    def gradient(self, w: Any) -> np.ndarray:
        return _like(self.l1 * np.sign(_as_float_array(w)), w)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


@_REGISTRY.register("l2")
class L2(Regularizer):
    """l2·Σw²."""

    def __init__(self, l2: float | None = 0.01) -> None:
        self.l2 = _check_factor(0.01 if l2 is None else l2, "l2")

    def __call__(self, w: Any) -> float:
        return self.l2 * float(np.sum(np.square(_as_float_array(w))))

    def gradient(self, w: Any) -> np.ndarray:
        return _like(2.0 * self.l2 * _as_float_array(w), w)

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}


@_REGISTRY.register("l1l2")
class L1L2(Regularizer):
    """l1·Σ|w| + l2·Σw² (class defaults 0/0, as Keras)."""

    def __init__(self, l1: float | None = 0.0, l2: float | None = 0.0) -> None:
        self.l1 = _check_factor(0.0 if l1 is None else l1, "l1")
        self.l2 = _check_factor(0.0 if l2 is None else l2, "l2")

    def __call__(self, w: Any) -> float:
        w64 = _as_float_array(w)
        loss = 0.0
        # Skipping zero factors keeps an unused term from turning Inf weights into NaN.
        if self.l1:
            loss += self.l1 * float(np.sum(np.abs(w64)))
        if self.l2:
            loss += self.l2 * float(np.sum(np.square(w64)))
        return loss

    def gradient(self, w: Any) -> np.ndarray:
        w64 = _as_float_array(w)
        grad = np.zeros_like(w64)
        if self.l1:
            grad += self.l1 * np.sign(w64)
        if self.l2:
            grad += 2.0 * self.l2 * w64
        return _like(grad, w)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


_REGISTRY.add_alias("l1_l2", L1L2, defaults={"l1": 0.01, "l2": 0.01})


def gradient(regularizer: Any, w: Any) -> np.ndarray:
    """Gradient of any accepted regularizer (plain callables: central finite differences)."""
    grad_fn = getattr(regularizer, "gradient", None)
    if callable(grad_fn):
        return grad_fn(w)
    return finite_difference_gradient(regularizer, w)


def get(identifier: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Resolve None, a name, a config dict, a Regularizer or a callable `f(w) -> float`."""
    return _REGISTRY.get(identifier, custom_objects)


def serialize(regularizer: Any) -> dict[str, Any] | str | None:
    """Keras 3 config dict (`module`, `class_name`, `config`, `registered_name`)."""
    return _REGISTRY.serialize(regularizer)


def deserialize(config: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Rebuild a regularizer from a Keras 3 / tf-keras 2 config dict or a name."""
    return _REGISTRY.deserialize(config, custom_objects)


__all__ = [
    "L1",
    "L1L2",
    "L2",
    "Regularizer",
    "deserialize",
    "finite_difference_gradient",
    "get",
    "gradient",
    "serialize",
]
