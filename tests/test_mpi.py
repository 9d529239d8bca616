"""Synchronized statistics across processes (``synchronized=True``).

- tests/mpi/scenarios.py under ``mpiexec -n 2`` and ``-n 3`` (and ``-n 1``): the layer against
  the single-process layer on the concatenated batch; MPICH and mpi4py come from the test extra.
- tests/mpi/test_mpi.cpp, the C++ ``batchnorm::mpi_communicator``, built here with CMake.
- In this process: the communicator argument (validation, config) and the reduction hook driven
  by threads through a plain-Python communicator, which needs no MPI at all.
Every launch has a time limit, after which its whole process group is killed: a collective that
some process never joins must fail the test, not hang it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import batchnorm

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "mpi" / "scenarios.py"
MULTI_PROCESS_SCENARIOS = [
    "nchw",
    "channels_last_mask",
    "float64_axes",
    "renorm",
    "ghost_batches",
    "large_mean",
    "split_groups",
    "invalid_communicators",
]
LAUNCH_TIMEOUT_S = 180


def _script(name: str) -> str | None:
    """An executable from this Python's scripts directory (where the mpich and cmake wheels put
    theirs), else from PATH: mpiexec must belong to the MPI that mpi4py loads."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    return str(candidate) if candidate.is_file() else shutil.which(name)


@pytest.fixture(scope="module")
def mpiexec() -> str:
    found = _script("mpiexec")
    if importlib.util.find_spec("mpi4py") is None or found is None:
        pytest.skip("needs mpi4py and mpiexec: pip install '.[test]' installs mpich and mpi4py")
    return found


def _launch(command: list[str], timeout: float = LAUNCH_TIMEOUT_S) -> str:
    """Runs `command` in its own process group; kills the group when it overruns."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the processes share the machine's cores
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s:\n{output[-8000:]}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {process.returncode}:\n{output[-8000:]}")
    return output


def _scenario(mpiexec: str, processes: int, scenario: str) -> None:
    command = [mpiexec, "-n", str(processes), sys.executable, "-m", "mpi4py", str(SCENARIOS)]
    output = _launch([*command, scenario])
    assert f"passed: {scenario} on {processes} processes" in output, output


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("scenario", MULTI_PROCESS_SCENARIOS)
def test_synchronized_across_processes(mpiexec: str, processes: int, scenario: str) -> None:
    _scenario(mpiexec, processes, scenario)


def test_one_mpi_process_is_exactly_unsynchronized(mpiexec: str) -> None:
    _scenario(mpiexec, 1, "single_process")


@pytest.fixture(scope="module")
def cpp_mpi_test(mpiexec: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/mpi/test_mpi.cpp as an MPI application builds it: the core installed into a
    temporary prefix (CUDA off, as the other C++ test builds), then tests/mpi/consumer with
    find_package(batchnorm COMPONENTS mpi) and the MPI of the mpich wheel."""
    try:
        cmake = str(Path(importlib.import_module("cmake").CMAKE_BIN_DIR) / "cmake")
    except (ImportError, AttributeError):
        cmake = shutil.which("cmake") or ""
    mpicxx = _script("mpicxx")
    if not Path(cmake).is_file() or mpicxx is None:
        pytest.skip("needs cmake and mpicxx: pip install '.[test]' installs both")
    work = tmp_path_factory.mktemp("mpi")
    generator = []
    ninja = _script("ninja")
    if ninja:
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))

    def build(source: Path, build: Path, *defines: str) -> None:
        configure = [cmake, "-S", str(source), "-B", str(build), *generator, *defines]
        _launch([*configure, "-DCMAKE_BUILD_TYPE=Release"], timeout=600)
        _launch([cmake, "--build", str(build), "-j", jobs], timeout=900)

    core, prefix, consumer = work / "core", work / "prefix", work / "consumer"
    build(
        ROOT,
        core,
        "-DBATCHNORM_BUILD_TESTS=OFF",
        "-DBATCHNORM_BUILD_PYTHON=OFF",
        "-DBATCHNORM_BUILD_BENCH=OFF",
        "-DBATCHNORM_ENABLE_CUDA=OFF",
        "-DBATCHNORM_INSTALL=ON",
    )
    _launch([cmake, "--install", str(core), "--prefix", str(prefix)])
    build(
        ROOT / "tests" / "mpi" / "consumer",
        consumer,
        f"-DCMAKE_PREFIX_PATH={prefix}",
        f"-DMPI_CXX_COMPILER={mpicxx}",
    )
    return consumer / "batchnorm_test_mpi"


@pytest.mark.parametrize("processes", [2, 3])
def test_cpp_mpi_communicator(mpiexec: str, cpp_mpi_test: Path, processes: int) -> None:
    output = _launch([mpiexec, "-n", str(processes), str(cpp_mpi_test)])
    assert f"passed: {processes} processes, 0 failures" in output, output


# ---- in this process: a communicator of threads, and the argument checks ---------------------
class ThreadGroup:
    """`size` threads that all-gather through shared slots: a communicator per thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[Any] = [None] * size
        self.calls = 0

    def member(self, rank: int) -> Any:
        group = self

        class Member:
            size = group.size

            def allgather(self, send: np.ndarray, receive: np.ndarray) -> None:
                group.slots[rank] = send.copy()
                group.barrier.wait()
                receive[...] = np.concatenate(group.slots)
                group.calls += rank == 0
                group.barrier.wait()

        return Member()

    def run(self, work: Any) -> list[Any]:
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = work(rank, self.member(rank))
            except BaseException as error:  # reported by the test thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread hung in the collective"
        if errors:
            raise errors[0]
        return results


def test_thread_communicator_matches_concatenated_batch() -> None:
    """The hook re-acquires the GIL inside kernels that released it; three threads with 5, 0 and
    8 samples get the layer of the 13-sample batch, one collective per pass."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(3.0, 2.0, (n, 4, 6)).astype(np.float32) for n in (5, 0, 8)]
    dys = [rng.normal(size=x.shape).astype(np.float32) for x in xs]
    group = ThreadGroup(3)

    def work(rank: int, member: Any) -> Any:
        layer = batchnorm.BatchNormalization(axis=1, synchronized=True, communicator=member)
        y = layer(xs[rank], training=True)
        return y, layer.backward(dys[rank]), layer.gradients, layer.get_weights()

    results = group.run(work)
    assert group.calls == 2
    single = batchnorm.BatchNormalization(axis=1)
    y = single(np.concatenate(xs), training=True)
    dx = single.backward(np.concatenate(dys))
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y, atol=2e-6)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), dx, atol=2e-6)
    for _, _, gradients, weights in results:
        for key, value in single.gradients.items():
            np.testing.assert_allclose(gradients[key], value, rtol=2e-6, atol=2e-6)
        for got, expected in zip(weights, single.get_weights()):
            np.testing.assert_allclose(got, expected, rtol=2e-6)
        for got, first in zip(weights, results[0][3]):
            np.testing.assert_array_equal(got, first)  # bitwise the same on every member


def test_failing_communicator_raises_and_changes_nothing() -> None:
    class Broken:
        size = 2

        def allgather(self, send: np.ndarray, receive: np.ndarray) -> None:
            raise ConnectionError("transport down")

    layer = batchnorm.BatchNormalization(synchronized=True, communicator=Broken())
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    layer.build(x.shape)
    before = layer.get_weights()
    with pytest.raises(ConnectionError, match="transport down"):
        layer(x, training=True)
    for got, expected in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(got, expected)


def test_communicator_of_one_process_is_never_called() -> None:
    class Alone:
        size = 1

        def allgather(self, send: np.ndarray, receive: np.ndarray) -> None:
            raise AssertionError("a single process must not communicate")

    x = np.random.default_rng(2).normal(size=(5, 2, 3)).astype(np.float32)
    a = batchnorm.BatchNormalization(synchronized=True, communicator=Alone())
    b = batchnorm.BatchNormalization()
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))
    np.testing.assert_array_equal(a.backward(x), b.backward(x))
    for got, expected in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(got, expected)


class _SizeOnly:
    size = 2


class _BoolSize:
    size = True

    def allgather(self, send: np.ndarray, receive: np.ndarray) -> None:
        pass


class _NoProcesses:
    size = 0

    def allgather(self, send: np.ndarray, receive: np.ndarray) -> None:
        pass


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"synchronized": True, "communicator": object()}, TypeError, "communicator must be"),
        ({"synchronized": True, "communicator": _SizeOnly()}, TypeError, "allgather"),
        ({"synchronized": True, "communicator": _BoolSize()}, TypeError, "int `size`"),
        ({"synchronized": True, "communicator": _NoProcesses()}, ValueError, "size must be >= 1"),
        ({"communicator": ThreadGroup(2).member(0)}, ValueError, "synchronized=True"),
    ],
)
def test_unusable_communicator_raises(kwargs: dict[str, Any], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        batchnorm.BatchNormalization(**kwargs)


def test_config_leaves_the_communicator_out() -> None:
    layer = batchnorm.BatchNormalization(synchronized=True, communicator=ThreadGroup(2).member(0))
    config = layer.get_config()
    assert config["synchronized"] is True
    assert "communicator" not in config
    clone = batchnorm.BatchNormalization.from_config(config)
    assert clone.synchronized and clone.communicator is None


class _MpiLibraryMissing(types.ModuleType):
    """An mpi4py whose MPI module cannot load its library (mpi4py installed without MPI)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("cannot load MPI library")


@pytest.mark.parametrize("mpi4py", [None, _MpiLibraryMissing("mpi4py")])
def test_without_usable_mpi4py_the_default_is_unsynchronized(
    monkeypatch: pytest.MonkeyPatch, mpi4py: Any
) -> None:
    """No mpi4py (None in sys.modules makes the import fail), or one that finds no MPI library
    (a warning says so): synchronized=True trains exactly as the unsynchronized layer."""
    monkeypatch.setitem(sys.modules, "mpi4py", mpi4py)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    x = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)
    layer = batchnorm.BatchNormalization(synchronized=True)
    if mpi4py is None:
        y = layer(x, training=True)
    else:
        with pytest.warns(RuntimeWarning, match="cannot load MPI library"):
            y = layer(x, training=True)
    single = batchnorm.BatchNormalization()
    np.testing.assert_array_equal(y, single(x, training=True))
    np.testing.assert_array_equal(layer.backward(x), single.backward(x))
