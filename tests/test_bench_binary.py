"""The installed `batchnorm-bench` command: a small case runs in every mode with results checked
against its float64 reference, `--calls` times back-to-back calls, and bad options are refused."""

from __future__ import annotations

import csv
import io
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
