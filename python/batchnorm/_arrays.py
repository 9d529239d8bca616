"""Array interchange: turns what users pass (NumPy arrays, lists) into arrays the kernels read
in place, and allocates results in the caller's framework."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._dtypes import is_bfloat16

_FLOAT_KINDS = "f"
_CONVERTIBLE_KINDS = "biuf"


def as_numpy(value: Any, what: str) -> np.ndarray:
    """A NumPy view of `value` without copying when it already is an array."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError) as error:
            raise TypeError(f"{what}: cannot read this array through DLPack ({error})") from error
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what}: expected an array, got {type(value).__name__}") from error


def check_numeric(array: np.ndarray, what: str) -> None:
    """Rejects dtypes Keras would not normalize (complex, object, strings, datetimes)."""
    if array.dtype.kind not in _CONVERTIBLE_KINDS and not is_bfloat16(array.dtype):
        raise TypeError(
            f"{what}: dtype {array.dtype} is not a real number type; batch normalization needs "
            "floating-point (or integer/bool, converted) data"
        )


def cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as `dtype`: the same object when it already is (zero-copy), else a converted copy."""
    if array.dtype == dtype:
        return array
    return array.astype(dtype)


def kernel_view(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """The view the extension reads: bfloat16 (ml_dtypes) travels as uint16 with a flag."""
    if is_bfloat16(array.dtype):
        return array.view(np.uint16), True
    return array, False
