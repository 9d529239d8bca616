"""The package's own consistency: one version everywhere, and type stubs that match the compiled
extension they describe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import batchnorm
from batchnorm import _core

ROOT = Path(__file__).resolve().parents[1]


def _read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def test_one_version_everywhere() -> None:
    pyproject = re.search(r'(?m)^version = "([^"]+)"', _read("pyproject.toml"))
    cmake = re.search(r"project\(batchnorm VERSION ([0-9.]+)", _read("CMakeLists.txt"))
    assert pyproject and cmake
    assert batchnorm.__version__ == pyproject.group(1) == cmake.group(1)
    from importlib.metadata import version

    assert version("batchnorm") == batchnorm.__version__  # what pip installed
    config = Path(batchnorm.__file__).parent / "lib" / "cmake" / "batchnorm"
    installed = config / "batchnormConfigVersion.cmake"
    if installed.is_file():  # the C++ package inside the wheel
        text = installed.read_text(encoding="utf-8")
        assert f'set(PACKAGE_VERSION "{batchnorm.__version__}")' in text


def test_stubs_match_the_extension(tmp_path: Path) -> None:
    """The installed _core.pyi is regenerated from the extension and compared."""
    stubgen = pytest.importorskip("nanobind.stubgen")
    installed = Path(_core.__file__).with_name("_core.pyi")
    assert installed.is_file(), "the wheel ships batchnorm/_core.pyi"
    fresh = tmp_path / "_core.pyi"
    subprocess.run(
        [sys.executable, "-m", stubgen.__name__, "-m", "batchnorm._core", "-o", str(fresh)],
        check=True,
        capture_output=True,
    )
    assert fresh.read_text(encoding="utf-8") == installed.read_text(encoding="utf-8")


def test_stubs_describe_the_keyword_only_operations() -> None:
    stub = Path(_core.__file__).with_name("_core.pyi").read_text(encoding="utf-8")
    for name in ("train_forward", "infer_forward", "train_backward", "infer_backward"):
        assert re.search(rf"def {name}\(\*, ", stub), name
    assert "def validate(" in stub and "def weight_schema(" in stub


_GRAPH_KEPT_AT_EXIT = """
import torch, batchnorm

class BN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer(x.detach(), training=True)

    @staticmethod
    def backward(ctx, g):
        return ctx.layer.backward(g), None

layer = batchnorm.BatchNormalization(axis=1)
conv = torch.nn.Conv2d(3, 4, 3)
y = BN.apply(conv(torch.randn(2, 3, 6, 6)), layer)  # a graph kept, never differentiated
"""


@pytest.mark.torch
def test_no_leak_report_at_exit_when_a_framework_keeps_the_layer() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _GRAPH_KEPT_AT_EXIT], capture_output=True, text=True, check=True
    )
    assert "leaked" not in result.stderr, result.stderr


_TRAINING_WITH_TORCH = """
import torch, batchnorm
from batchnorm import functional as F

torch.manual_seed(0)
conv = torch.nn.Conv2d(3, 8, 3)
layers = [batchnorm.BatchNormalization(axis=1, renorm=True), batchnorm.BatchNormalization(axis=-1)]
mask = torch.rand(4, 6, 6) > 0.2
for step in range(20):
    x = conv(torch.randn(4, 3, 8, 8)).detach()
    h = layers[0](x, training=True)
    y = layers[1](h.permute(0, 2, 3, 1), training=True, mask=mask)
    dh = layers[1].backward(torch.ones_like(y)).permute(0, 3, 1, 2)
    layers[0].backward(dh, out=torch.empty_like(h))
    for layer in layers:
        layer.apply_gradients(0.01)
        layer.get_weights()
    layers[0](x)  # inference
    try:
        layers[0](x, training=True, out=torch.empty(1))  # refused: a wrong out
    except ValueError:
        pass
# Kept to the end: contexts of the functional API, the last training outputs, a reference cycle.
options = F.Options(axis=1)
weights = F.initial_weights(options, (4, 8, 6, 6))
kept = [F.forward(x, weights, options, training=True) for _ in range(3)]
cycle = [layers[0]]
cycle.append(cycle)
"""


@pytest.mark.torch
def test_no_leak_report_at_exit_after_training_with_torch_tensors() -> None:
    """A training script with PyTorch tensors (both layouts, masks, out=, a refused call, the
    functional API's contexts and a reference cycle alive at exit) ends without nanobind's report
    of leaked instances or types."""
    result = subprocess.run(
        [sys.executable, "-c", _TRAINING_WITH_TORCH], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "leaked" not in result.stderr, result.stderr[-4000:]


def test_repeated_calls_do_not_grow_the_heap() -> None:
    import tracemalloc

    import numpy as np

    layer = batchnorm.BatchNormalization(axis=1)
    x = np.random.default_rng(0).normal(size=(8, 4, 5)).astype(np.float32)
    dy = np.ones_like(x)

    def step() -> None:
        layer(x, training=True)
        layer.backward(dy)
        layer.apply_gradients(0.01)
        layer(x)

    for _ in range(50):  # warm caches
        step()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(2000):
        step()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after 2000 steps"


def test_main_module_reports_the_installation(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "batchnorm"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    info = _core.runtime_info()
    assert result.stdout.startswith(f"batchnorm {batchnorm.__version__}\n")
    assert f"CPU kernels:      {info['cpu_instruction_set']}" in result.stdout
    assert f"OpenMP threads:   {info['cpu_threads']} per call" in result.stdout
    assert "CUDA backend:" in result.stdout and "torch (installed)" in result.stdout
    assert info["cpu_instruction_set"] in ("baseline", "avx2", "avx512")
    assert info["cpu_threads"] >= 1 and info["cuda_devices"] >= 0
    version = subprocess.run(
        [sys.executable, "-m", "batchnorm", "--version"], capture_output=True, text=True
    )
    assert version.stdout.strip() == batchnorm.__version__
    lowered = subprocess.run(
        [sys.executable, "-m", "batchnorm"],
        capture_output=True,
        text=True,
        env={**os.environ, "BATCHNORM_CPU_ISA": "baseline", "OMP_NUM_THREADS": "1"},
    )
    assert "CPU kernels:      baseline" in lowered.stdout
    assert "OpenMP threads:   1 per call (OMP_NUM_THREADS=1)" in lowered.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "batchnorm", "--cmake-dir", "--version"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "not allowed with" in wrong.stderr


def test_a_user_script_passes_mypy_strict(tmp_path: Path) -> None:
    """The public API is typed precisely enough for `mypy --strict` without casts: results have
    the input's array type, the weights are declared attributes (a misspelt one is an error)."""
    mypy = pytest.importorskip("mypy.api")
    script = Path(__file__).parent / "typecheck" / "user_script.py"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    stdout, stderr, status = mypy.run(["--strict", *cache, str(script)])
    assert status == 0, stdout + stderr
    misspelt = tmp_path / "misspelt.py"
    misspelt.write_text("import batchnorm\n\nprint(batchnorm.BatchNormalization().moving_men)\n")
    stdout, _, status = mypy.run(["--strict", *cache, str(misspelt)])
    assert status == 1 and 'has no attribute "moving_men"' in stdout
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
