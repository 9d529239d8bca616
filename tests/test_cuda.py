"""The CUDA backend against the CPU backend on the same inputs and weights: every layout (row,
plane, general strided, misaligned), dtype (float32, float64, float16, bfloat16), mode
(training with masks, ghost batches, renorm, adjustment; inference; both backward passes) and
odd sizes, plus bitwise run-to-run determinism, the framework's current stream and the device
checks. Device arrays come from PyTorch (with CUDA) or CuPy; without a CUDA device, a CUDA
build, or either library, the module skips."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

import batchnorm

if not batchnorm.cuda_available():
    pytest.skip("no CUDA device here (or a build without CUDA)", allow_module_level=True)


def _device_library() -> Any:
    try:
        import torch

        if torch.cuda.is_available():
            return torch
    except ImportError:
        pass
    try:
        import cupy

        return cupy
    except ImportError:
        return None


LIB = _device_library()
if LIB is None:
    pytest.skip("CUDA tests need PyTorch with CUDA or CuPy", allow_module_level=True)
TORCH = LIB.__name__ == "torch"
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def to_device(a: np.ndarray) -> Any:
    if not TORCH:
        return LIB.asarray(a)
    if a.dtype == BF16:
        return LIB.from_numpy(np.ascontiguousarray(a).view(np.int16)).cuda().view(LIB.bfloat16)
    return LIB.from_numpy(np.ascontiguousarray(a)).cuda()


def to_host(a: Any) -> np.ndarray:
    if not TORCH:
        return LIB.asnumpy(a)
    if a.dtype == LIB.bfloat16:
        return a.cpu().view(LIB.int16).numpy().view(BF16)
    return a.cpu().numpy()


def misaligned(a: Any) -> Any:
    """The same values one element past an aligned start: no vector loads."""
    flat = a.reshape(-1)
    if isinstance(a, np.ndarray):
        holder = np.empty(flat.size + 1, a.dtype)
    elif TORCH:
        holder = LIB.empty(flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    else:
        holder = LIB.empty(flat.size + 1, dtype=flat.dtype)
    holder[1:] = flat
    return holder[1:].reshape(a.shape)


def channels_last(a: Any) -> Any:
    """NCHW values stored NHWC (PyTorch's channels_last): features innermost in memory."""
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if TORCH:
        return a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return LIB.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def expanded(a: Any) -> Any:
    """The first sample repeated along the batch with stride 0 (an expanded view, no copy)."""
    if TORCH and not isinstance(a, np.ndarray):
        return a[:1].expand(*a.shape)
    library = np if isinstance(a, np.ndarray) else LIB
    return library.broadcast_to(a[:1], a.shape)


VIEWS: dict[str, Callable[[Any], Any]] = {
    "contiguous": lambda a: a,
    "misaligned": misaligned,
    "strided": lambda a: a[:, ::2],
    "transposed": lambda a: a.transpose(1, 0) if a.ndim == 2 else a.swapaxes(0, 2),
    "channels_last": channels_last,
    "expanded": expanded,
}


def adjust(shape: tuple[int, ...]) -> tuple[float, float]:
    return 1.25, -0.5


# (shape before the view, layer arguments, view); the view is applied on both devices.
CASES = [
    ((8, 16, 6, 6), {"axis": 1}, "contiguous"),  # NCHW, plane, vector loads
    ((8, 6, 6, 16), {"axis": -1}, "contiguous"),  # NHWC, row, vector loads
    ((64, 33), {"axis": -1}, "contiguous"),  # row, odd feature count
    ((4, 7, 5), {"axis": 1}, "contiguous"),  # plane, odd run
    ((2, 8, 150, 150), {"axis": 1}, "contiguous"),  # several chunks per statistic
    ((70000, 4), {"axis": -1}, "contiguous"),  # several row chunks
    ((6, 4, 8), {"axis": -1, "virtual_batch_size": 2}, "contiguous"),
    ((6, 8, 3, 3), {"axis": 1, "virtual_batch_size": 3}, "contiguous"),
    ((4, 5, 6, 8), {"axis": [1, 3]}, "contiguous"),
    ((5, 1, 1, 7), {"axis": -1}, "contiguous"),
    ((1, 3, 1, 1), {"axis": 1}, "contiguous"),  # batch of one: dx is exactly zero
    (
        (6, 5, 4),
        {"axis": 1, "renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}},
        "contiguous",
    ),
    ((6, 9), {"center": False, "scale": False}, "contiguous"),
    ((8, 16, 6, 6), {"axis": 1, "adjustment": adjust}, "contiguous"),
    ((8, 6, 6, 16), {"axis": -1, "adjustment": adjust, "renorm": True}, "contiguous"),
    ((8, 16, 6, 6), {"axis": 1}, "misaligned"),
    ((8, 6, 6, 16), {"axis": -1}, "misaligned"),
    ((10, 12, 5), {"axis": -1}, "strided"),
    ((10, 12, 5), {"axis": 1}, "transposed"),
    ((4, 16, 8, 8), {"axis": 1}, "contiguous"),  # H*W a multiple of 8: vector plane kernels
    ((34, 2, 32768), {"axis": 1}, "contiguous"),  # more than 32 chunks per statistic (plane)
    ((140000, 8), {"axis": -1}, "contiguous"),  # more than 32 chunks per statistic (row)
    ((8, 16, 6, 6), {"axis": 1}, "channels_last"),
    ((6, 5, 16), {"axis": -1}, "expanded"),
    ((6, 5, 7), {"axis": 1}, "expanded"),
    ((0, 8, 4, 4), {"axis": 1}, "contiguous"),  # an empty batch
    ((0, 5), {"axis": -1}, "contiguous"),
]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
# Unit roundoff of each dtype: the two backends compute each value with the same formulas but in
# other orders (and the GPU contracts into fused multiply-adds), so a result may round to the
# neighbouring value of its dtype, on top of a few roundings of the compute type.
ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def random_weights(layer: batchnorm.BatchNormalization, rng: np.random.Generator) -> list:
    weights = []
    for w in layer.weights:
        if w.name in ("moving_variance", "moving_stddev", "renorm_stddev"):
            weights.append(rng.uniform(0.5, 2.0, w.shape))
        elif w.name == "gamma":
            weights.append(rng.uniform(0.5, 1.5, w.shape))
        else:
            weights.append(rng.normal(0.0, 0.5, w.shape))
    return weights


def layers(shape: tuple[int, ...], dtype: str, kwargs: dict[str, Any], seed: int = 0):
    """A CPU layer and an identical one moved to the GPU."""
    kwargs = {"momentum": 0.8, "dtype": "float64" if dtype == "float64" else "float32", **kwargs}
    cpu = batchnorm.BatchNormalization(**kwargs)
    gpu = batchnorm.BatchNormalization(**kwargs)
    cpu.build(shape)
    gpu.build(shape)
    weights = random_weights(cpu, np.random.default_rng(seed))
    cpu.set_weights(weights)
    gpu.set_weights(weights)
    assert gpu.to("cuda:0") is gpu and gpu.device == "cuda:0"
    return cpu, gpu


def host_data(shape: tuple[int, ...], dtype: str, seed: int, mean: float) -> np.ndarray:
    values = np.random.default_rng(seed).normal(mean, 2.0, size=shape)
    return values.astype(BF16 if dtype == "bfloat16" else np.dtype(dtype))


def close(gpu: Any, cpu: Any, dtype: str, what: str) -> None:
    """Per element: one step of `dtype`'s rounding at the value, plus 64 roundings of the compute
    type (float32, float64 for float64 data) at the largest value, for the different operation
    order. A NaN (an element the kernels did not write) fails."""
    got = np.asarray(to_host(gpu) if not isinstance(gpu, np.ndarray) else gpu, np.float64)
    want = np.asarray(cpu, np.float64)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    compute = ROUNDOFF["float64" if dtype == "float64" else "float32"]
    tolerance = 2 * ROUNDOFF[dtype] * np.abs(want) + 64 * compute * scale
    bad = ~(np.abs(got - want) <= tolerance)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} elements differ, first at "
        f"{np.argwhere(bad)[0].tolist()}: {got[bad][0]!r} vs {want[bad][0]!r}"
    )


def close_gradients(gpu: batchnorm.BatchNormalization, cpu: batchnorm.BatchNormalization) -> None:
    """dgamma and dbeta: float64 sums rounded once to the weights' dtype."""
    for key in cpu.gradients:
        want = np.asarray(cpu.gradients[key], np.float64)
        value = gpu.gradients[key]
        got = np.asarray(value if isinstance(value, np.ndarray) else to_host(value), np.float64)
        roundoff = ROUNDOFF[str(cpu.gradients[key].dtype)]
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * roundoff * scale, err_msg=key)


def nan_like(a: Any) -> Any:
    """An output pre-filled with NaN, contiguous whatever a's layout: an element the kernels do
    not write stays NaN."""
    if TORCH:
        return LIB.full(tuple(a.shape), float("nan"), dtype=a.dtype, device=a.device)
    return LIB.full(a.shape, np.nan, dtype=a.dtype)


def close_weights(gpu: batchnorm.BatchNormalization, cpu: batchnorm.BatchNormalization) -> None:
    for w_gpu, w_cpu, v in zip(gpu.get_weights(), cpu.get_weights(), cpu.weights):
        tol = 1e-11 if w_cpu.dtype == np.float64 else 2e-6
        np.testing.assert_allclose(w_gpu, w_cpu, rtol=tol, atol=tol, err_msg=v.name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kwargs,view", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_cuda_matches_cpu(
    shape: tuple[int, ...], kwargs: dict[str, Any], view: str, dtype: str, training: bool
) -> None:
    if dtype == "bfloat16" and not TORCH:
        pytest.skip("CuPy has no bfloat16")
    x_host = VIEWS[view](host_data(shape, dtype, 1, 3.0))
    dy_host = VIEWS[view](host_data(shape, dtype, 2, 0.0))
    x = VIEWS[view](to_device(host_data(shape, dtype, 1, 3.0)))
    dy = VIEWS[view](to_device(host_data(shape, dtype, 2, 0.0)))
    cpu, gpu = layers(tuple(x_host.shape), dtype, kwargs)
    y_cpu = cpu(x_host, training=training)
    y_gpu = gpu(x, training=training, out=nan_like(x))
    assert type(y_gpu) is type(x)
    close(y_gpu, y_cpu, dtype, "output")
    close_weights(gpu, cpu)
    close(gpu.backward(dy, out=nan_like(x)), cpu.backward(dy_host), dtype, "dx")
    close_gradients(gpu, cpu)
    # The default results (allocated by the framework) agree with the pre-filled ones.
    _, again = layers(tuple(x_host.shape), dtype, kwargs)
    close(again(x, training=training), y_cpu, dtype, "output without out=")


MASKED = [
    {},
    {"virtual_batch_size": 2},  # ghost batches, one of them without valid positions
    {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}},
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["btc", "nchw"])
@pytest.mark.parametrize("kwargs", MASKED, ids=["plain", "ghost", "renorm"])
def test_cuda_masks_match_cpu(dtype: str, layout: str, kwargs: dict[str, Any]) -> None:
    if dtype == "bfloat16" and not TORCH:
        pytest.skip("CuPy has no bfloat16")
    rng = np.random.default_rng(3)
    if layout == "btc":
        shape, axis, mask = (6, 40, 8), -1, rng.random((6, 40)) > 0.3
    else:
        shape, axis, mask = (4, 8, 5, 8), 1, rng.random((4, 1, 5, 8)) > 0.3  # per pixel
    mask[:2] = False  # samples without valid positions: an empty ghost batch
    x_host = host_data(shape, dtype, 4, -2.0)
    dy_host = host_data(shape, dtype, 5, 0.0)
    cpu, gpu = layers(shape, dtype, {"axis": axis, **kwargs})
    x = to_device(x_host)
    y_cpu = cpu(x_host, training=True, mask=mask)
    y_gpu = gpu(x, training=True, mask=to_device(mask), out=nan_like(x))
    close(y_gpu, y_cpu, dtype, "output")
    close_weights(gpu, cpu)
    close(gpu.backward(to_device(dy_host), out=nan_like(x)), cpu.backward(dy_host), dtype, "dx")
    close_gradients(gpu, cpu)


def test_cuda_results_are_bitwise_reproducible() -> None:
    x = to_device(host_data((16, 32, 20, 20), "float32", 6, 100.0))
    dy = to_device(host_data((16, 32, 20, 20), "float32", 7, 0.0))
    runs = []
    for _ in range(2):
        _, gpu = layers(tuple(x.shape), "float32", {"axis": 1, "renorm": True})
        y = to_host(gpu(x, training=True))
        dx = to_host(gpu.backward(dy))
        runs.append([y, dx, to_host(gpu.gradients["gamma"]), *gpu.get_weights()])
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_cuda_large_mean_variance_is_exact() -> None:
    """|mean| / std = 1e6 keeps the variance to 1e-5 relative (float64 merges)."""
    base = np.random.default_rng(8).normal(0.0, 1.0, size=(4096, 3))
    x_host = (base + 1e6).astype(np.float32)
    _, gpu = layers(x_host.shape, "float32", {"momentum": 0.0})
    gpu(to_device(x_host), training=True)
    var = x_host.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(gpu.moving_variance.numpy(), var, rtol=1e-5)


@pytest.mark.skipif(not TORCH, reason="streams are checked with PyTorch")
def test_cuda_work_runs_on_the_current_torch_stream() -> None:
    x_host = host_data((32, 64, 16, 16), "float32", 9, 1.0)
    cpu, gpu = layers(x_host.shape, "float32", {"axis": 1})
    source = to_device(x_host)
    LIB.cuda.synchronize()
    stream = LIB.cuda.Stream()
    with LIB.cuda.stream(stream):
        # The producer is held back on the side stream: kernels queued anywhere else would read
        # x (and dy) before they are written.
        LIB.cuda._sleep(200_000_000)
        x = source * 1.0
        dy = LIB.ones_like(x)
        y = gpu(x, training=True)
        dx = gpu.backward(dy)
    stream.synchronize()
    close(y, cpu(x_host, training=True), "float32", "output")
    close(dx, cpu.backward(np.ones_like(x_host)), "float32", "dx")
    close_gradients(gpu, cpu)
    close_weights(gpu, cpu)


CAPTURED = [
    ({}, False),
    ({"virtual_batch_size": 4}, False),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}}, False),
    ({}, True),
    ({"virtual_batch_size": 4, "renorm": True}, True),
]


@pytest.mark.skipif(not TORCH, reason="CUDA graphs are captured with PyTorch")
@pytest.mark.parametrize("kwargs,masked", CAPTURED, ids=["plain", "ghost", "renorm", "mask", "all"])
def test_torch_cuda_graph_replays_a_training_step(kwargs: dict[str, Any], masked: bool) -> None:
    """torch.cuda.graph captures a training forward + backward of the module; each replay on
    new data in the captured input gives what an eager step gives (output, dx, dgamma, dbeta and
    the moving statistics it updates)."""
    from batchnorm.torch import BatchNormalization as Module

    torch = LIB
    shape = (8, 6, 5, 5)
    module = Module(6, axis=1, momentum=0.9, **kwargs).cuda()
    eager = Module(6, axis=1, momentum=0.9, **kwargs).cuda()
    rng = np.random.default_rng(5)
    x = torch.zeros(shape, device="cuda", requires_grad=True)
    dy = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).cuda()
    mask = torch.from_numpy(rng.random((8, 1, 5, 5)) < 0.7).cuda() if masked else None

    def step(m: Any, data: Any) -> Any:
        m.zero_grad(set_to_none=True)
        y = m(data, mask)
        y.backward(dy)
        return y

    # Warm-up on a side stream (builds the module and the allocator's pools), as PyTorch asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            with torch.no_grad():
                x.copy_(torch.randn(shape, device="cuda"))
            x.grad = None
            step(module, x)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step(module, x)
    eager.load_state_dict(module.state_dict())  # capturing ran nothing: the state after warm-up
    for seed in (1, 2):
        data = torch.from_numpy(
            np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 2 + 1
        ).cuda()
        with torch.no_grad():
            x.copy_(data)
        graph.replay()
        x_eager = data.clone().requires_grad_(True)
        y_eager = step(eager, x_eager)
        torch.cuda.synchronize()
        pairs = [(y_static, y_eager, "y"), (x.grad, x_eager.grad, "dx")]
        pairs += [(module.gamma.grad, eager.gamma.grad, "dgamma")]
        pairs += [(module.beta.grad, eager.beta.grad, "dbeta")]
        pairs += [(getattr(module, n), getattr(eager, n), n) for n in module._moving_names]
        for got, want, what in pairs:
            # The same kernels on the same data: bitwise equal.
            assert torch.equal(got, want), f"replay {seed}: {what} differs from an eager step"


def test_cuda_device_checks_and_moves() -> None:
    x_host = host_data((4, 3), "float32", 10, 0.0)
    cpu, gpu = layers(x_host.shape, "float32", {})
    with pytest.raises(ValueError, match="cuda:0"):
        cpu(to_device(x_host))
    with pytest.raises(ValueError, match="cpu"):
        gpu(x_host)
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu.to(f"cuda:{batchnorm._core.cuda_device_count()}")
    weights = gpu.get_weights()
    gpu.to("cpu")
    for a, b in zip(gpu.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(gpu(x_host), cpu(x_host), rtol=0, atol=0)


def test_layer_built_after_moving() -> None:
    layer = batchnorm.BatchNormalization(axis=1).to("cuda")
    x_host = host_data((8, 3, 4), "float32", 11, 5.0)
    y = layer(to_device(x_host), training=True)
    ref = batchnorm.BatchNormalization(axis=1)
    close(y, ref(x_host, training=True), "float32", "output")
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-6)


def test_jax_arrays_on_cuda() -> None:
    jax = pytest.importorskip("jax")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    x_host = host_data((8, 4, 6), "float32", 12, 2.0)
    mask = np.random.default_rng(13).random((8, 4)) > 0.3  # Keras form: (batch, axis 1)
    cpu, gpu = layers(x_host.shape, "float32", {"axis": 1})
    x = jax.device_put(x_host, device)
    y = gpu(x, training=True, mask=jax.device_put(mask, device))
    assert isinstance(y, jax.Array)
    close(np.asarray(y), cpu(x_host, training=True, mask=mask), "float32", "output")
    dx = gpu.backward(jax.device_put(np.ones_like(x_host), device))
    close(np.asarray(dx), cpu.backward(np.ones_like(x_host)), "float32", "dx")
