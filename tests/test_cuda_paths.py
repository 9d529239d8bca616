"""The Python side of the CUDA paths, without a GPU: the extension's CUDA services are replaced
by a recorder, so that what the package asks of them can be checked here. JAX results on CUDA
(device buffers the kernels write and JAX adopts), the ordering of arrays made by another
framework on its own stream, and the copies made inside a call (queued on the call's stream,
never waited for on the host)."""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

from batchnorm import _arrays, functional

CUDA0 = _arrays.Device("cuda", 0)


class Buffer:
    """Stands in for the extension's device buffer (an nb_ndarray exporting DLPack)."""

    def __init__(self, shape: list[int], dtype: str, device: int) -> None:
        self.shape, self.dtype_name, self.device = tuple(shape), dtype, device

    def __dlpack__(self, **kwargs: Any) -> tuple[str, Any]:
        return ("capsule", kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return 2, self.device


class Recorder:
    """The extension's CUDA services, recording each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def cuda_empty(self, shape: list[int], dtype: str, device: int) -> Buffer:
        return Buffer(shape, dtype, device)

    def cuda_empty_on_stream(self, shape: list[int], dtype: str, device: int) -> Buffer:
        self.calls.append(("cuda_empty_on_stream", tuple(shape)))
        return Buffer(shape, dtype, device)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith(("cuda_", "set_cuda_stream")):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))


class JaxArray:
    """A JAX array on CUDA device 0: what the adapter reads of one."""

    def __init__(self, shape: tuple[int, ...], dtype: str = "float32") -> None:
        self.shape, self.dtype, self.awaited = shape, np.dtype(dtype), False

    def __dlpack_device__(self) -> tuple[int, int]:
        return 2, 0

    def block_until_ready(self) -> JaxArray:
        self.awaited = True
        return self

    def astype(self, dtype: Any) -> JaxArray:
        return JaxArray(self.shape, np.dtype(dtype).name)


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(_arrays, "_core", recorder)
    monkeypatch.setattr(functional, "_core", recorder)
    return recorder


@pytest.fixture
def jax(monkeypatch: pytest.MonkeyPatch) -> Any:
    adopted: list[Any] = []
    module = types.SimpleNamespace(
        Array=JaxArray,
        core=types.SimpleNamespace(Tracer=type("Tracer", (), {})),  # (what framework_of tests)
        dlpack=types.SimpleNamespace(from_dlpack=lambda a: adopted.append(a) or ("jax", a)),
        adopted=adopted,
    )
    monkeypatch.setitem(sys.modules, "jax", module)
    monkeypatch.setattr(_arrays, "_cache", {})
    return module


def test_jax_results_on_cuda_are_device_buffers_that_kernels_and_jax_read(
    core: Recorder, jax: Any
) -> None:
    x = JaxArray((4, 3))
    framework = _arrays.framework_of(x)
    assert isinstance(framework, _arrays.JaxFramework)
    y = framework.empty_like(x)
    assert isinstance(y, _arrays.DeviceArray)
    assert (y.shape, y.dtype_name, y.device) == ((4, 3), "float32", CUDA0)
    view = framework.kernel(y)  # what the extension reads through DLPack
    assert view.__dlpack__(max_version=(1, 0)) == ("capsule", {"max_version": (1, 0)})
    assert view.__dlpack_device__() == (2, 0)
    dgamma = framework.empty((3,), "float32", CUDA0)
    assert isinstance(dgamma, _arrays.DeviceArray) and dgamma.size == 3
    # Handed to JAX only once the kernels writing it are done (JAX knows nothing of the stream).
    assert framework.finish(y, CUDA0) == ("jax", y)
    assert core.calls == [("cuda_synchronize", 0)] and jax.adopted == [y]


def test_jax_arrays_cast_without_numpy_flags(jax: Any) -> None:
    framework = _arrays.framework_of(JaxArray((2,)))
    x = JaxArray((2, 5), "float32")
    assert framework.cast(x, np.dtype(np.float32)) is x
    assert framework.cast(x, np.dtype(np.float64)).dtype == np.float64


def test_arrays_of_another_framework_are_ordered_before_the_kernels(
    core: Recorder, jax: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    torch_framework = _arrays.framework_of(torch.zeros(1))
    monkeypatch.setattr(type(torch_framework), "stream", lambda self, device: 7)
    x, dy = torch.zeros(4, 3), JaxArray((4, 3))
    functional._on_stream(torch_framework, CUDA0, [x, dy, None])
    # The kernels run on torch's stream, after JAX's work on dy (awaited: JAX has no stream to
    # wait for) and after the default stream JAX's arrays are read on.
    assert dy.awaited
    assert core.calls == [("set_cuda_stream", 7), ("cuda_wait_stream", 0, 0)]
    core.calls.clear()
    functional._on_stream(torch_framework, CUDA0, [x, torch.ones(4, 3)])
    assert core.calls == [("set_cuda_stream", 7)]  # one framework: its stream orders it all


def test_copies_inside_a_call_are_queued_on_its_stream(core: Recorder) -> None:
    """A call's own vectors are allocated, copied and (after their uses) freed in the call's
    stream order: no host wait, where cudaMalloc/cudaFree would wait for the device."""
    gamma = _arrays.DeviceArray((3,), "float32", CUDA0)
    assert not gamma.ordered and core.calls == []  # a layer's weight: plain device memory
    kept = _arrays.copy_vector(gamma)
    assert isinstance(kept, _arrays.DeviceArray) and kept is not gamma and kept.ordered
    assert core.calls == [
        ("cuda_empty_on_stream", (3,)),
        ("cuda_copy_on_stream", kept.buffer, gamma.buffer),
        ("cuda_used", kept.buffer),
    ]
    core.calls.clear()
    host = np.arange(3, dtype=np.float32)
    scale = functional._device_adjustment(host, CUDA0)
    assert isinstance(scale, _arrays.DeviceArray) and scale.shape == (3,) and scale.ordered
    assert [c[0] for c in core.calls] == [
        "cuda_empty_on_stream",
        "cuda_copy_on_stream",
        "cuda_used",
    ]
    np.testing.assert_array_equal(core.calls[1][2], host)
    assert functional._device_adjustment(host, _arrays.CPU) is host
    assert functional._device_adjustment(scale, CUDA0) is scale
    core.calls.clear()
    # A backward records its reads of the call's own vectors, not of the layer's weights.
    _arrays.mark_used([gamma, kept, None, host])
    assert core.calls == [("cuda_used", kept.buffer)]


class StepRecorder(Recorder):
    """The extension for a whole training step: the operations are recorded with their
    keyword arguments, each training forward gets a context of its own, and what is not a CUDA
    service or an operation (options, schemas) is the real extension's."""

    def __init__(self, real: Any) -> None:
        super().__init__()
        self.real = real

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("cuda_", "set_cuda_stream")):
            return super().__getattr__(name)
        return getattr(self.real, name)

    @property
    def TrainingContext(self) -> type:  # noqa: N802 (the extension's class name)
        recorder = self

        class Context:
            @staticmethod
            def pooled(features: int) -> Context:
                return Context()

            @staticmethod
            def in_device_storage(*args: Any) -> tuple[str, tuple[Any, ...]]:
                recorder.calls.append(("in_device_storage", *args))
                return ("device statistics", args)

        return Context

    def train_forward(self, **kwargs: Any) -> None:
        self.calls.append(("train_forward", kwargs))

    def train_backward(self, **kwargs: Any) -> None:
        self.calls.append(("train_backward", kwargs))


class FakeWeights:
    """Bound weights on CUDA device 0 (the extension's Weights reads the device from DLPack)."""

    def __init__(self, **vectors: Any) -> None:
        self.vectors = {name: v for name, v in vectors.items() if v is not None}

    device = (2, 0)
    dtype = "float32"

    @property
    def features(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    def vector(self, name: str) -> Any:
        return self.vectors.get(name)

    def has(self, name: str) -> bool:
        return name in self.vectors


def test_a_training_step_asks_nothing_a_cuda_graph_capture_forbids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PyTorch training forward + backward on CUDA keeps its statistics and its copy of gamma
    in tensors of PyTorch's allocator (during a capture, the graph's pool) and asks the extension
    for no allocation, free, host copy or wait of its own: what torch.cuda.graph needs."""
    torch = pytest.importorskip("torch")
    core = StepRecorder(functional._core)
    monkeypatch.setattr(_arrays, "_core", core)
    monkeypatch.setattr(functional, "_core", core)
    monkeypatch.setattr(functional, "Weights", FakeWeights)
    framework = _arrays.framework_of(torch.zeros(1))
    made: list[Any] = []

    def empty(self: Any, shape: tuple[int, ...], name: str, device: Any) -> Any:
        made.append(torch.empty(shape, dtype=getattr(torch, name)))
        return made[-1]

    monkeypatch.setattr(type(framework), "device", lambda self, array: CUDA0)
    monkeypatch.setattr(type(framework), "stream", lambda self, device: 7)
    monkeypatch.setattr(type(framework), "empty", empty)
    options = functional.Options(axis=1, virtual_batch_size=2)
    gamma = torch.ones(3)
    weights = FakeWeights(
        gamma=gamma, beta=torch.zeros(3), moving_mean=torch.zeros(3), moving_variance=torch.ones(3)
    )
    x = torch.randn(4, 3, 5)
    mask = torch.ones(4, 1, 5, dtype=torch.bool)
    _, context = functional.forward(x, weights, options, training=True, mask=mask)
    dx, dgamma, dbeta = functional.backward(torch.randn(4, 3, 5), context)
    names = [call[0] for call in core.calls]
    assert names == ["set_cuda_stream", "cuda_copy_on_stream", "train_forward"] + [
        "set_cuda_stream",
        "train_backward",
    ]
    kept = context.weights.vector("gamma")
    assert core.calls[1][1:] == (kept, gamma) and kept is not gamma and kept is made[0]
    storage = core.calls[2][1]["statistics_storage"]
    # 2 ghost groups x 3 features of count, mean and inv_std, then zscale and zshift.
    assert storage is context.storage and storage is made[1]
    assert storage.shape == (functional.packed_size(options, x.shape),) == (24,)
    assert storage.dtype == torch.float64
    assert core.calls[4][1]["weights"] is context.weights
    assert {id(t) for t in (dgamma, dbeta)} <= {id(t) for t in made}
    assert dx.shape == x.shape


def test_a_non_boolean_mask_is_refused_during_a_torch_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    framework = _arrays.framework_of(torch.zeros(1))
    mask = torch.ones(2, 3)
    assert framework.all_binary(mask)
    monkeypatch.setattr(type(mask), "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(ValueError, match="pass a boolean mask"):
        framework.all_binary(mask)


def test_the_compile_route_hands_cuda_statistics_on_as_the_device_array(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.compile's ops pass a CUDA forward's statistics to the backward op as the forward's
    statistics storage, which the backward's context reads in place (no host copy either way)."""
    torch = pytest.importorskip("torch")
    from batchnorm import torch as bn_torch

    core = StepRecorder(functional._core)
    monkeypatch.setattr(functional, "_core", core)
    framework = _arrays.framework_of(torch.zeros(1))
    monkeypatch.setattr(type(framework), "device", lambda self, array: CUDA0)
    options = functional.Options(axis=-1, virtual_batch_size=2)
    x = torch.randn(4, 3)
    storage = torch.zeros(functional.packed_size(options, x.shape), dtype=torch.float64)
    statistics = object()
    context = functional.Context(True, x, None, options, None, statistics, None, storage)
    assert bn_torch._pack(context) is storage  # no statistics.pack(): nothing reads the host
    rebuilt = functional.training_context(x, None, {"gamma": torch.ones(3)}, options, storage)
    assert core.calls == [("in_device_storage", storage, 2, 3, False, True)]
    assert rebuilt.statistics == ("device statistics", (storage, 2, 3, False, True))
    assert rebuilt.storage is storage  # kept alive with the context
