"""Shared test set-up: the float64 reference importable from every test module (under any
pytest import mode), the suite's markers, and the skips every module would otherwise repeat."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only tests/test_fuzz.py needs it, and it comes with the test extra
    settings = None

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # `from reference import ReferenceBN` in every module


if settings is not None:
    _RELAXED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    # Both profiles: no example database, no deadline, a blob that reproduces a failure.
    common = {
        "database": None,
        "deadline": None,
        "print_blob": True,
        "suppress_health_check": _RELAXED,
    }
    # The suite's fuzzing (tests/test_fuzz.py): the same cases on every run.
    settings.register_profile("batchnorm", max_examples=2000, derandomize=True, **common)
    # The long hunt, by hand: `--hypothesis-profile=long` or BATCHNORM_FUZZ=long; new random
    # cases each run.
    settings.register_profile("long", max_examples=25000, derandomize=False, **common)
    settings.load_profile(os.environ.get("BATCHNORM_FUZZ", "batchnorm"))


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
