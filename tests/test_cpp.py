"""The C++ side, driven from pytest so that the README's test command covers it: the CTest
unit tests (tests/cpp), an install into a temporary prefix with a consumer project built against
it (tests/consumer), the C++ example of docs/cpp.md compiled and run as written, and a build against
the C++ package inside the installed wheel (`python -m batchnorm --cmake-dir`). CMake and Ninja
come from the `test` extra's PyPI packages; only a C++ compiler is expected on the machine."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPP_PAGE = ROOT / "docs" / "cpp.md"
CONSUMER = ROOT / "tests" / "consumer"
JOBS = str(max(1, min(os.cpu_count() or 1, 8)))


def _tool(name: str, module_name: str, attribute: str) -> str:
    """An executable of a PyPI package (cmake, ninja), else from PATH."""
    try:
        directory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        directory = None
    found = shutil.which(name, path=str(directory)) if directory else None
    found = found or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install '.[test]')")
    return found


@pytest.fixture(scope="session")
def cmake() -> str:
    return _tool("cmake", "cmake", "CMAKE_BIN_DIR")


@pytest.fixture(scope="session")
def ninja() -> str:
    return _tool("ninja", "ninja", "BIN_DIR")


def _run(*command: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    args = [str(c) for c in command]
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-8000:]}"
        )
    return result.stdout


def _build(
    cmake: str,
    ninja: str,
    source: Path,
    build: Path,
    *defines: str,
    env: dict[str, str] | None = None,
) -> str:
    """Configures (Ninja, Release) and builds; returns the configure output."""
    configured = _run(
        cmake,
        "-S",
        source,
        "-B",
        build,
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}",
        "-DCMAKE_BUILD_TYPE=Release",
        *defines,
        env=env,
    )
    _run(cmake, "--build", build, "--parallel", JOBS, env=env)
    return configured


@pytest.fixture(scope="session")
def cpp_build(cmake: str, ninja: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tree built as a C++ project: the core library and the C++ API tests. The CUDA backend
    is left to the wheel build (compiling it here would double the slowest step) and the MPI
    test to tests/test_mpi.py."""
    build = tmp_path_factory.mktemp("cpp") / "build"
    _build(
        cmake,
        ninja,
        ROOT,
        build,
        "-DBATCHNORM_BUILD_TESTS=ON",
        "-DBATCHNORM_INSTALL=ON",
        "-DBATCHNORM_BUILD_PYTHON=OFF",
        "-DBATCHNORM_BUILD_BENCH=OFF",
        "-DBATCHNORM_ENABLE_CUDA=OFF",
        "-DBATCHNORM_ENABLE_MPI=OFF",
    )
    return build


@pytest.fixture(scope="session")
def install_prefix(cmake: str, cpp_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("prefix")
    _run(cmake, "--install", cpp_build, "--prefix", prefix)
    return prefix


def test_cpp_unit_tests_pass_under_ctest(cmake: str, cpp_build: Path) -> None:
    ctest = shutil.which("ctest", path=str(Path(cmake).parent)) or shutil.which("ctest")
    assert ctest, "ctest not found next to cmake"
    output = _run(ctest, "--output-on-failure", "--parallel", JOBS, cwd=cpp_build)
    for name in ("cpp.layer", "cpp.functions", "cpp.errors"):
        assert name in output, output


def test_kernels_inline_the_coefficients_per_block_methods(cpp_build: Path) -> None:
    """The span coefficients' per-block methods stay inlined in the kernels: where GCC's inlining
    budget for a kernel unit ran short, it once called make_block out of line for every block of
    16 lanes (a vzeroupper before each call), which tripled the time of a small NCHW inference
    without changing a result. An out-of-line copy is a symbol of the (unstripped) library."""
    nm = shutil.which("nm")
    assert nm, "nm (binutils, installed with the C++ compiler) not found"
    libraries = sorted(cpp_build.glob("libbatchnorm.so*"))
    assert libraries, sorted(p.name for p in cpp_build.iterdir())
    symbols = _run(nm, "-C", libraries[0])
    assert "plane_affine" in symbols, "the library's symbols are missing (stripped?)"
    out_of_line = re.findall(
        r"\w+Coefficients<[^>]*>::(?:get|advance|next_block|make_block)\(", symbols
    )
    assert not out_of_line, sorted(set(out_of_line))


@pytest.fixture(scope="session")
def sanitized_build(cmake: str, ninja: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C++ tests built with AddressSanitizer and UndefinedBehaviorSanitizer (library and
    tests instrumented, -O0: see BATCHNORM_SANITIZE in CMakeLists.txt)."""
    build = tmp_path_factory.mktemp("sanitized") / "build"
    _build(
        cmake,
        ninja,
        ROOT,
        build,
        "-DBATCHNORM_SANITIZE=address,undefined",
        "-DBATCHNORM_BUILD_TESTS=ON",
        "-DBATCHNORM_INSTALL=OFF",
        "-DBATCHNORM_BUILD_PYTHON=OFF",
        "-DBATCHNORM_BUILD_BENCH=OFF",
        "-DBATCHNORM_ENABLE_CUDA=OFF",
        "-DBATCHNORM_ENABLE_MPI=OFF",
    )
    return build


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GCC/Clang sanitizers on Linux")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpp_unit_tests_pass_under_address_and_undefined_behavior_sanitizers(
    cmake: str, sanitized_build: Path, isa: str
) -> None:
    """Every kernel set (an instruction set the CPU lacks falls back to one it has) runs the C++
    tests with leak checks; any finding makes the test binary exit non-zero."""
    library = next(sanitized_build.glob("libbatchnorm.so*"))
    assert "libasan" in _run("ldd", library), "the library is not instrumented"
    ctest = shutil.which("ctest", path=str(Path(cmake).parent)) or shutil.which("ctest")
    assert ctest, "ctest not found next to cmake"
    env = dict(
        os.environ,
        BATCHNORM_CPU_ISA=isa,
        ASAN_OPTIONS="detect_leaks=1:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    output = _run(ctest, "--output-on-failure", "--parallel", JOBS, cwd=sanitized_build, env=env)
    for name in ("cpp.layer", "cpp.functions", "cpp.errors"):
        assert name in output, output
    assert "runtime error" not in output and "Sanitizer" not in output, output


def test_install_tree_has_headers_library_and_config(install_prefix: Path) -> None:
    headers = install_prefix / "include" / "batchnorm"
    # The public API and nothing else: the private headers stay in cpp/src.
    installed = sorted(str(p.relative_to(headers)) for p in headers.rglob("*") if p.is_file())
    assert installed == ["batchnorm.hpp", "layer.hpp", "mpi.hpp"], installed
    configs = list(install_prefix.glob("lib*/cmake/batchnorm/batchnormConfig.cmake"))
    assert len(configs) == 1, configs
    config_dir = configs[0].parent
    assert (config_dir / "batchnormConfigVersion.cmake").is_file()
    assert (config_dir / "batchnormTargets.cmake").is_file()
    assert list(config_dir.parent.parent.glob("*batchnorm*")), "no compiled library installed"
    assert "find_dependency(OpenMP" in configs[0].read_text()
    # Nothing of CUDA to find for the package's users, whatever the build.
    assert "find_dependency(CUDAToolkit" not in configs[0].read_text()
    assert "CUDA::" not in (config_dir / "batchnormTargets.cmake").read_text()


def test_consumer_project_builds_against_the_install_prefix(
    cmake: str, ninja: str, install_prefix: Path, tmp_path: Path
) -> None:
    configured = _build(
        cmake, ninja, CONSUMER, tmp_path / "build", f"-DCMAKE_PREFIX_PATH={install_prefix}"
    )
    assert f"in {install_prefix}" in configured, configured
    output = _run(tmp_path / "build" / "consumer")
    assert "consumer: ok" in output


def _cpp_page() -> str:
    return CPP_PAGE.read_text(encoding="utf-8")


def test_documented_cpp_example_builds_and_runs(
    cmake: str, ninja: str, install_prefix: Path, tmp_path: Path
) -> None:
    """The C++ page's first cpp block, built with its first cmake block, exactly as written."""
    section = _cpp_page()
    program = re.search(r"```cpp\n(.*?)```", section, re.S)
    lists = re.search(r"```cmake\n(.*?)```", section, re.S)
    assert program and lists, "docs/cpp.md needs a ```cpp and a ```cmake block"
    target = re.search(r"add_executable\((\w+)\s+([\w.]+)\)", lists.group(1))
    assert target, "the cmake block must add the example executable"
    source = tmp_path / "example"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(lists.group(1))
    (source / target.group(2)).write_text(program.group(1))
    _build(cmake, ninja, source, tmp_path / "build", f"-DCMAKE_PREFIX_PATH={install_prefix}")
    _run(tmp_path / "build" / target.group(1))


def _imported_from_installed_wheel() -> bool:
    """Whether `import batchnorm` resolves to an installed distribution's package directory
    (found without importing it)."""
    spec = importlib.util.find_spec("batchnorm")
    if spec is None or spec.origin is None:
        return False
    try:
        distribution = importlib.metadata.distribution("batchnorm")
    except importlib.metadata.PackageNotFoundError:
        return False
    package = Path(spec.origin).resolve().parent
    return Path(str(distribution.locate_file("batchnorm"))).resolve() == package


def test_wheel_ships_a_usable_cpp_package(cmake: str, ninja: str, tmp_path: Path) -> None:
    if not _imported_from_installed_wheel():
        pytest.skip("batchnorm is imported from a development tree, not from an installed wheel")
    cmake_dir = _run(sys.executable, "-m", "batchnorm", "--cmake-dir", cwd=tmp_path).strip()
    include_dir = _run(sys.executable, "-m", "batchnorm", "--include-dir", cwd=tmp_path).strip()
    assert (Path(cmake_dir) / "batchnormConfig.cmake").is_file()
    assert (Path(include_dir) / "batchnorm" / "batchnorm.hpp").is_file()
    configured = _build(cmake, ninja, CONSUMER, tmp_path / "build", f"-Dbatchnorm_DIR={cmake_dir}")
    assert f"in {cmake_dir}" in configured, configured
    output = _run(tmp_path / "build" / "consumer")
    assert "consumer: ok" in output


def _without_cuda_toolkit() -> dict[str, str]:
    """The environment with nvcc off PATH and no variable pointing CMake at a CUDA toolkit."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT")
    }
    env["PATH"] = os.pathsep.join(
        entry
        for entry in env.get("PATH", "").split(os.pathsep)
        if entry and not (Path(entry) / "nvcc").exists()
    )
    return env


def test_wheel_cpp_package_needs_no_cuda_toolkit(cmake: str, ninja: str, tmp_path: Path) -> None:
    """A consumer of the wheel's C++ package builds and runs where CMake finds no CUDA toolkit,
    also when the wheel carries the CUDA backend (as it does wherever nvcc was found at build
    time): the library holds the CUDA runtime itself."""
    if not _imported_from_installed_wheel():
        pytest.skip("batchnorm is imported from a development tree, not from an installed wheel")
    cmake_dir = _run(sys.executable, "-m", "batchnorm", "--cmake-dir", cwd=tmp_path).strip()
    env = _without_cuda_toolkit()
    configured = _build(
        cmake,
        ninja,
        CONSUMER,
        tmp_path / "build",
        f"-Dbatchnorm_DIR={cmake_dir}",
        "-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=TRUE",
        env=env,
    )
    assert f"in {cmake_dir}" in configured, configured
    output = _run(tmp_path / "build" / "consumer", env=env)
    assert "consumer: ok" in output
