"""Shared test set-up: the float64 reference importable from every test module (under any
pytest import mode), the suite's markers, and the skips every module would otherwise repeat."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # `from reference import ReferenceBN` in every module


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA build of batchnorm and a visible CUDA device"
    )
    config.addinivalue_line("markers", "torch: needs PyTorch")
    config.addinivalue_line("markers", "jax: needs JAX")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import batchnorm

    reasons = {
        "cuda": None if batchnorm.cuda_available() else "no CUDA device (or a build without CUDA)",
        "torch": None if has_module("torch") else "PyTorch is not installed",
        "jax": None if has_module("jax") else "JAX is not installed",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason is not None and item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
