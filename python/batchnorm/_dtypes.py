"""Dtype policies of the layer: Keras' policy names mapped to what the kernels compute with.

Every policy computes statistics in float32 (float64 for "float64") and keeps the weights in
float32 (float64); the policy only decides which dtype inputs are cast to and outputs come in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Policy:
    name: str
    compute: str  # the dtype inputs are cast to (16-bit inputs keep theirs under float32)
    variable: str  # the weights' dtype


_POLICIES = {
    "float32": Policy("float32", "float32", "float32"),
    "float64": Policy("float64", "float64", "float64"),
    "float16": Policy("float16", "float16", "float32"),
    "bfloat16": Policy("bfloat16", "bfloat16", "float32"),
    "mixed_float16": Policy("mixed_float16", "float16", "float32"),
    "mixed_bfloat16": Policy("mixed_bfloat16", "bfloat16", "float32"),
}


def policy_from(dtype: Any) -> Policy:
    """Resolves the `dtype` argument: a policy name, a NumPy dtype, or a Keras policy config."""
    if dtype is None:
        return _POLICIES["float32"]
    if isinstance(dtype, dict):
        # tf.keras 2: {"class_name": "Policy", "config": {"name": ...}};
        # Keras 3: {"module": "keras", "class_name": "DTypePolicy", "config": {"name": ...}}.
        name = dtype.get("config", {}).get("name")
        if not isinstance(name, str):
            raise ValueError(f"dtype: cannot read a policy name from the config {dtype!r}")
        return policy_from(name)
    name = getattr(dtype, "name", dtype)
    if isinstance(name, np.dtype):
        name = name.name
    if not isinstance(name, str):
        name = np.dtype(dtype).name if isinstance(dtype, type) else name
    if isinstance(name, str) and name in _POLICIES:
        return _POLICIES[name]
    raise ValueError(f"dtype: unsupported policy {dtype!r}; expected one of {', '.join(_POLICIES)}")


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a name; bfloat16 comes from ml_dtypes (imported only when needed)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as error:  # pragma: no cover - exercised only without ml_dtypes
            raise TypeError(
                "bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes)"
            ) from error
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_bfloat16(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16 is a NumPy "void"-kind extension type; checking the kind first keeps
    # the common path free of the (slow) dtype.name lookup.
    return dtype.kind == "V" and dtype.name == "bfloat16"


def data_dtype(policy: Policy, input_dtype: np.dtype) -> np.dtype:
    """The dtype the kernels see for an input: 16-bit inputs stay 16-bit under a float32
    policy (Keras computes them in float32 and returns the input dtype); every other input is
    cast to the policy's compute dtype."""
    if policy.compute == "float32":
        if input_dtype == _FLOAT32:
            return _FLOAT32
        if input_dtype == _FLOAT16 or is_bfloat16(input_dtype):
            return input_dtype
    return numpy_dtype(policy.compute)


_FLOAT32 = np.dtype(np.float32)
_FLOAT16 = np.dtype(np.float16)
