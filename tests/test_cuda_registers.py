"""The register budget of the CUDA kernels, from ptxas (no GPU needed, nvcc is): the streaming
kernels (moments, normalization, backward sums, dx) spill nothing, and those of float32 and
16-bit data keep at least 3 blocks of 256 threads resident per sm_90 SM (37.5% occupancy).
bench/cuda_registers.py prints the whole table."""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest
from bench_scripts import load

STREAMING = re.compile(r"(row|plane)_(moments|affine|backward_sums|backward_dx)<(\w+),")

if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed here", allow_module_level=True)


def _script() -> Any:
    return load("cuda_registers")


def test_occupancy_follows_the_sm90_limits() -> None:
    occupancy = _script().occupancy
    assert occupancy(64, 0) == 0.5
    assert occupancy(80, 6144) == 0.375
    assert occupancy(88, 0) == 0.25
    assert occupancy(160, 0) == 0.125
    assert occupancy(32, 100 * 1024) == 0.25  # two blocks of 100 KiB of shared memory


def test_streaming_kernels_fit_the_register_budget() -> None:
    script = _script()
    rows = script.parse(script.compile_log("sm_90"))
    streaming = [row for row in rows if STREAMING.match(row[0])]
    assert len(streaming) >= 60, rows  # every family, dtype and width was compiled
    for name, registers, stores, loads, shared in streaming:
        assert (stores, loads) == (0, 0), f"{name} spills {stores}/{loads} bytes"
        if STREAMING.match(name).group(3) != "double":
            assert script.occupancy(registers, shared) >= 0.375, f"{name}: {registers} registers"
