"""Arrays from other frameworks on the CPU: PyTorch tensors, JAX arrays and plain DLPack
producers are read in place and results come back in the caller's framework, equal bit for bit
to the NumPy path (the same kernels run). Zero-copy is proven for NumPy and PyTorch: `out=`
keeps its memory, no input copy is made (copying methods disabled, no traced allocation) and the
layer keeps a reference to the caller's input, not a copy. Device placement and its errors are
checked with CUDA absent as well."""

from __future__ import annotations

import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest

import batchnorm

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(7)


def data(shape: tuple[int, ...], dtype: Any = np.float32, mean: float = 1.5) -> np.ndarray:
    return RNG.normal(mean, 2.0, size=shape).astype(dtype)


def pair(**kwargs: Any) -> tuple[batchnorm.BatchNormalization, batchnorm.BatchNormalization]:
    """Two identical layers: the NumPy reference and the one fed another framework's arrays."""
    return batchnorm.BatchNormalization(**kwargs), batchnorm.BatchNormalization(**kwargs)


def same_weights(a: batchnorm.BatchNormalization, b: batchnorm.BatchNormalization) -> None:
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


CASES = [
    ((6, 4, 5, 3), {"axis": 1}),
    ((6, 5, 3, 4), {"axis": -1}),
    ((8, 7, 6), {"axis": [1, 2]}),
    ((8, 3, 4), {"axis": -1, "virtual_batch_size": 2}),
    ((6, 4, 5), {"axis": 1, "renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}),
]


@pytest.mark.parametrize("shape,kwargs", CASES)
def test_torch_training_inference_backward_equal_numpy(
    shape: tuple[int, ...], kwargs: dict[str, Any]
) -> None:
    x = data(shape)
    dy = data(shape, mean=0.0)
    ref, lay = pair(momentum=0.8, **kwargs)
    y_ref = ref(x, training=True)
    y = lay(torch.from_numpy(x), training=True)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), y_ref)
    same_weights(ref, lay)

    dx = lay.backward(torch.from_numpy(dy))
    dx_ref = ref.backward(dy)
    assert isinstance(dx, torch.Tensor)
    np.testing.assert_array_equal(dx.numpy(), dx_ref)
    for key in ref.gradients:
        assert isinstance(lay.gradients[key], torch.Tensor)
        assert tuple(lay.gradients[key].shape) == ref.gradients[key].shape
        np.testing.assert_array_equal(lay.gradients[key].numpy(), ref.gradients[key])

    lay.apply_gradients(0.1)
    ref.apply_gradients(0.1)
    same_weights(ref, lay)
    np.testing.assert_array_equal(lay(torch.from_numpy(x)).numpy(), ref(x))
    np.testing.assert_array_equal(lay.backward(torch.from_numpy(dy)).numpy(), ref.backward(dy))


@pytest.mark.parametrize("mask_kind", ["bool", "int", "broadcast", "keepdims"])
def test_torch_masks_equal_numpy(mask_kind: str) -> None:
    x = data((6, 4, 5))  # (B, T, C), axis -1: the mask is (B, T)
    mask = RNG.random((6, 4)) > 0.4
    mask[0] = False  # a sample with no valid position
    masks = {
        "bool": mask,
        "int": mask.astype(np.int64),
        "broadcast": mask[:1],  # broadcast over the batch
        "keepdims": mask[..., None],  # Keras layout with the feature axis kept as 1
    }
    m = masks[mask_kind]
    ref, lay = pair()
    y_ref = ref(x, training=True, mask=m)
    y = lay(torch.from_numpy(x), training=True, mask=torch.from_numpy(np.ascontiguousarray(m)))
    np.testing.assert_array_equal(y.numpy(), y_ref)
    same_weights(ref, lay)
    dy = data(x.shape, mean=0.0)
    np.testing.assert_array_equal(lay.backward(torch.from_numpy(dy)).numpy(), ref.backward(dy))


def test_torch_mask_errors() -> None:
    lay = batchnorm.BatchNormalization()
    x = torch.from_numpy(data((4, 3, 2)))
    with pytest.raises(ValueError, match="0/1"):
        lay(x, training=True, mask=torch.full((4, 3), 2))
    with pytest.raises(ValueError, match="does not fit"):
        lay(x, training=True, mask=torch.ones((4, 2), dtype=torch.bool))


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16", "int32"])
def test_torch_dtypes(dtype: str) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = data((8, 3, 4))
    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    if dtype == "int32":
        x = np.rint(x * 3)
    ref, lay = pair(axis=1)
    xt = torch.from_numpy(x).to(getattr(torch, dtype))
    y = lay(xt, training=True)
    y_ref = ref(x.astype(numpy_dtype), training=True)
    expected = dtype if dtype in ("float16", "bfloat16") else "float32"  # the float32 policy
    assert str(y.dtype) == f"torch.{expected}"
    np.testing.assert_array_equal(y.float().numpy(), np.asarray(y_ref).astype(np.float32))
    dy = np.ones_like(x)
    dx = lay.backward(torch.from_numpy(dy))
    assert str(dx.dtype) == f"torch.{expected}"
    np.testing.assert_array_equal(
        dx.float().numpy(), np.asarray(ref.backward(dy)).astype(np.float32)
    )


def test_torch_strided_views_and_autograd_tensors() -> None:
    base = data((5, 6, 7, 8))
    views = [
        torch.from_numpy(base).to(memory_format=torch.channels_last),  # NHWC storage
        torch.from_numpy(base)[:, 1:5, ::2, 1:],  # sliced, stepped
        torch.from_numpy(base).transpose(1, 3),  # transposed
        torch.from_numpy(base).requires_grad_(True),  # autograd leaf: read through detach()
    ]
    for view in views:
        ref, lay = pair(axis=1)
        if view.requires_grad:  # the output is detached: said once, not left silent
            with pytest.warns(UserWarning, match="does not record PyTorch autograd history"):
                y = lay(view, training=True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                lay(view, training=True)  # once per layer
        else:
            y = lay(view, training=True)
        expected = ref(view.detach().numpy(), training=True)
        np.testing.assert_array_equal(y.detach().numpy(), expected)
        assert not y.requires_grad


@pytest.fixture
def no_torch_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every tensor method that could copy data raise."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the layer copied a tensor")

    for name in ("contiguous", "clone", "to", "cpu", "__array__", "copy_", "float"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    view = torch.Tensor.numpy

    def numpy_view(tensor: torch.Tensor, *, force: bool = False) -> np.ndarray:
        # Without force, numpy() is a view of the tensor's memory or an error, never a copy.
        if force:
            raise AssertionError("the layer copied a tensor")
        result = view(tensor)
        assert result.__array_interface__["data"][0] == tensor.data_ptr()
        return result

    monkeypatch.setattr(torch.Tensor, "numpy", numpy_view)


def test_torch_zero_copy(no_torch_copies: None) -> None:
    x_np = data((16, 8, 6, 6))
    x = torch.from_numpy(x_np)[:, :, 1:, :]  # a strided view, read in place
    out = torch.from_numpy(np.empty(tuple(x.shape), np.float32))
    pointer = out.data_ptr()
    lay = batchnorm.BatchNormalization(axis=1)
    y = lay(x, training=True, out=out)
    assert y is out and y.data_ptr() == pointer
    assert lay._last.x is x  # what backward reads again is the caller's own tensor
    dx_out = torch.from_numpy(np.empty(tuple(x.shape), np.float32))
    dx = lay.backward(torch.from_numpy(np.ones(tuple(x.shape), np.float32)), out=dx_out)
    assert dx is dx_out


def test_numpy_zero_copy_no_traced_allocation() -> None:
    x = data((32, 16, 32, 32))[:, :, :, 1:]  # 2 MB, non-contiguous
    out = np.empty(x.shape, np.float32)
    lay = batchnorm.BatchNormalization(axis=1)
    lay(x, training=True, out=out)  # builds the layer and warms every cache
    dx_out = np.empty(x.shape, np.float32)
    tracemalloc.start()
    try:
        y = lay(x, training=True, out=out)
        dx = lay.backward(x, out=dx_out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert y is out and dx is dx_out
    # No copy of the input and no output allocation: only small bookkeeping is traced.
    assert peak < x.nbytes // 20, (peak, x.nbytes)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_backward_reads_the_callers_memory(framework: str) -> None:
    """The layer keeps a reference to the input, not a copy: changing the input in place between
    the call and backward changes the inference-mode dgamma accordingly."""
    x_np = data((8, 3))
    dy = data((8, 3), mean=0.0)
    x = torch.from_numpy(x_np) if framework == "torch" else x_np
    lay = batchnorm.BatchNormalization()
    lay(x)
    lay.backward(dy)
    before = batchnorm._arrays.to_numpy(lay.gradients["gamma"]).astype(np.float64)
    x_np += 1.0  # in place: visible through the tensor too
    lay.backward(dy)
    after = batchnorm._arrays.to_numpy(lay.gradients["gamma"]).astype(np.float64)
    inv_std = 1.0 / np.sqrt(1.0 + lay.epsilon)
    np.testing.assert_allclose(after - before, dy.sum(axis=0) * inv_std, atol=1e-4)


class Producer:
    """A minimal DLPack producer that is neither NumPy nor a known framework."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.array.__dlpack_device__()


def test_plain_dlpack_producer_is_read_in_place() -> None:
    x = data((9, 5))
    ref, lay = pair()
    y = lay(Producer(x), training=True, mask=Producer(np.arange(9) % 3 > 0))
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, ref(x, training=True, mask=np.arange(9) % 3 > 0))


def test_out_must_match_the_inputs_framework_and_layout() -> None:
    lay = batchnorm.BatchNormalization()
    x = torch.from_numpy(data((4, 3)))
    with pytest.raises(TypeError, match="PyTorch"):
        lay(x, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="NumPy"):
        lay(x.numpy(), out=torch.empty(4, 3))
    with pytest.raises(ValueError, match="dtype float32"):
        lay(x, out=torch.empty(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="overlap"):
        lay(x, out=x)
    shifted = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="overlap"):
        lay(shifted[:4], out=shifted[1:])


def test_mixed_frameworks_on_the_cpu() -> None:
    """A NumPy mask or dy with a tensor input: all on the CPU, results in the input's framework."""
    x = data((6, 4))
    dy = data((6, 4), mean=0.0)
    mask = np.arange(6) % 2 == 0
    ref, lay = pair()
    y = lay(torch.from_numpy(x), training=True, mask=mask)
    np.testing.assert_array_equal(y.numpy(), ref(x, training=True, mask=mask))
    dx = lay.backward(dy)
    assert isinstance(dx, torch.Tensor)
    np.testing.assert_array_equal(dx.numpy(), ref.backward(dy))


def test_set_weights_and_adjustment_accept_tensors() -> None:
    x = data((5, 3))
    ref, lay = pair(adjustment=lambda shape: (torch.full((3,), 1.5), torch.zeros(3)))
    ref.adjustment = lambda shape: (np.full(3, 1.5), np.zeros(3))
    ref.build(x.shape)
    lay.build(x.shape)
    weights = [data((3,)) for _ in ref.get_weights()]
    ref.set_weights(weights)
    lay.set_weights([torch.from_numpy(w) for w in weights])
    np.testing.assert_array_equal(lay(torch.from_numpy(x), training=True).numpy(), ref(x, True))


def test_devices_without_cuda() -> None:
    lay = batchnorm.BatchNormalization()
    assert lay.device == "cpu"
    assert lay.to("cpu") is lay
    with pytest.raises(ValueError, match="device must be"):
        lay.to("tpu")
    if batchnorm.cuda_available():
        pytest.skip("a CUDA device is present (tests/test_cuda.py covers it)")
    assert batchnorm.cuda_available() is False  # answers without a driver, never crashes
    with pytest.raises(ValueError, match="no CUDA device"):
        lay.to("cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        lay.to("cuda:1")


@pytest.mark.jax
def test_jax_arrays_round_trip() -> None:
    import jax.numpy as jnp

    x = data((6, 4, 5))
    dy = data((6, 4, 5), mean=0.0)
    mask = RNG.random((6, 1, 5)) > 0.3  # per (sample, position), broadcast over the channels
    ref, lay = pair(axis=1)
    y = lay(jnp.asarray(x), training=True, mask=jnp.asarray(mask))
    assert type(y).__module__.startswith("jax")
    np.testing.assert_array_equal(np.asarray(y), ref(x, training=True, mask=mask))
    dx = lay.backward(jnp.asarray(dy))
    np.testing.assert_array_equal(np.asarray(dx), ref.backward(dy))
    np.testing.assert_array_equal(np.asarray(lay.gradients["gamma"]), ref.gradients["gamma"])
    with pytest.raises(TypeError, match="immutable"):
        lay(jnp.asarray(x), out=jnp.asarray(x))
    y16 = lay(jnp.asarray(x, dtype=jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
