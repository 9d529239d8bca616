"""The CUDA backend's logic without a GPU: its real kernels, launchers and operations compiled for
the host against the CUDA emulation of tests/cuda_host/include (each block's threads run as
fibers that meet at every __syncthreads and warp shuffle; device memory is NaN-filled host
memory), and compared with the CPU backend over layouts, dtypes, modes, masks, ghost batches,
renorm, strided, expanded, misaligned and empty inputs, more than 32 chunks per statistic and
communicators of 2 and 3 ranks; and training steps (plain, ghost batches, renorm, masks,
adjustment) captured as CUDA graphs under the emulation's capture checks, which also fail a step
whose statistics the backend allocates itself (tests/cuda_host/test_kernels.cpp)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_cpp import _build, _tool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
    ninja = _tool("ninja", "ninja", "BIN_DIR")
    build = tmp_path_factory.mktemp("cuda_host") / "build"
    _build(cmake, ninja, ROOT / "tests" / "cuda_host", build)
    return build / "batchnorm_cuda_host"


def _run(harness: Path, *arguments: str) -> str:
    result = subprocess.run([str(harness), *arguments], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    return output


def test_emulated_cuda_backend_matches_the_cpu_backend(harness: Path) -> None:
    output = _run(harness)
    assert " 0 failures" in output, output
    runs = int(output.split(" runs,")[0].split()[-1])
    assert runs >= 200, output  # every case, dtype and mode ran
