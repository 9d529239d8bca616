"""The installed `batchnorm-bench` command: a small case runs in every mode with results checked
against its float64 reference, `--calls` times back-to-back calls, `--read-probe` prints the
byte model's ceilings for row layouts, and bad options are refused."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench() -> str:
    found = shutil.which("batchnorm-bench", path=str(Path(sys.executable).parent))
    found = found or shutil.which("batchnorm-bench")
    if found is None:
        pytest.fail("batchnorm-bench is not installed (pip install . installs it)")
    return found


def _rows(bench: str, *options: str) -> list[dict[str, str]]:
    result = subprocess.run(
        [bench, "--shape", "8,24", "--threads", "1", "--reps", "2", "--csv", "-", *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    table = result.stdout[result.stdout.index("case,mode") :]
    return list(csv.DictReader(io.StringIO(table)))


@pytest.mark.parametrize("calls", ["1", "5"])
def test_every_mode_is_timed_and_checked(bench: str, calls: str) -> None:
    rows = _rows(bench, "--calls", calls)
    assert [row["mode"] for row in rows] == ["train", "infer", "backward"]
    for row in rows:
        assert float(row["min_ms"]) > 0.0
        assert float(row["min_ms"]) <= float(row["median_ms"])
        assert float(row["max_rel_error"]) < 1e-5


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_calls_must_be_positive(bench: str, value: str) -> None:
    result = subprocess.run(
        [bench, "--shape", "8,24", "--calls", value], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--calls must be >= 1" in result.stderr


def test_read_probe_prints_the_row_ceilings_of_its_ratio(bench: str) -> None:
    result = subprocess.run(
        [bench, "--read-probe", "4", "--threads", "1", "--reps", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ratio = re.search(r"read / copy r = ([\d.]+)", result.stdout)
    ceilings = re.search(
        r"training forward at most (\d+)% .* backward at most (\d+)%", result.stdout
    )
    assert ratio and ceilings, result.stdout
    r = float(ratio.group(1))
    assert r > 0.0
    # The byte model's shares for a pass pair that reads the input twice.
    assert abs(int(ceilings.group(1)) - 150 / (1 + r)) <= 1.5
    assert abs(int(ceilings.group(2)) - 250 / (1.5 + 2 * r)) <= 1.5


@pytest.mark.parametrize("value", ["0", "x"])
def test_read_probe_needs_a_size(bench: str, value: str) -> None:
    result = subprocess.run(
        [bench, "--read-probe", value], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--read-probe needs a size of at least 1 MiB" in result.stderr
