"""Array interchange: reads what users pass (NumPy, PyTorch, CuPy, JAX or any DLPack producer, on
the CPU or a CUDA device) where it lies, and makes results with the caller's own framework on
the caller's device. The kernels see every array through DLPack, so nothing is copied.

Each supported library is a `Framework`: how to name an array's dtype and device, cast it,
allocate a like-shaped result, hand it to the kernels and, on CUDA, which stream its work is
ordered on. Frameworks are recognized without importing them (a library that was never
imported cannot have made the array)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from ._dtypes import is_bfloat16, numpy_dtype

_REAL_PREFIXES = ("float", "int", "uint", "bool", "bfloat16")
# Results of at least this many bytes come from the extension's buffer cache (`empty_like`).
# Below it the C library's allocator reuses resident memory of its own and the cache saves nothing
# (an inference of 256 KiB took as long either way); at 1 MiB a cached result already halves the
# cost of a call that allocates, and the gain grows with the size.
CACHED_BYTES = 1 << 20
_DLPACK_CPU = 1
_DLPACK_CUDA = 2
_NUMPY_DTYPE_NAMES: dict[np.dtype, str] = {}


@dataclass(frozen=True)
class Device:
    """Where an array lives: the CPU or CUDA device `index`."""

    type: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


def parse_device(spec: Any) -> Device:
    """A Device from "cpu", "cuda", "cuda:N", a torch.device or a Device."""
    if isinstance(spec, Device):
        return spec
    text = str(spec).strip().lower()
    if text == "cpu":
        return CPU
    if text == "cuda":
        return Device("cuda", 0)
    if text.startswith("cuda:") and text[5:].isdigit():
        return Device("cuda", int(text[5:]))
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


class Framework:
    """NumPy's behaviour; other libraries override what differs."""

    label = "NumPy"
    # Whether `empty` gives CUDA memory of the library's own allocator (stream-ordered, and a
    # CUDA graph's pool during capture), fit for what a call keeps for its backward.
    allocates_device_memory = False

    def dtype(self, array: Any) -> Any:
        return array.dtype

    def dtype_name(self, array: Any) -> str:
        # NumPy builds dtype.name anew on every access (several microseconds): memoize it,
        # since small tensors are dominated by such per-call costs.
        dtype = array.dtype
        name = _NUMPY_DTYPE_NAMES.get(dtype)
        if name is None:
            name = _NUMPY_DTYPE_NAMES.setdefault(dtype, dtype.name)
        return name

    def device(self, array: Any) -> Device:
        return CPU

    def cast(self, array: Any, dtype: np.dtype) -> Any:
        """`array` itself when it already has `dtype` and is aligned (zero-copy), else a
        converted or aligned copy: the kernels read elements through typed pointers, which must
        be aligned to the item size (NumPy views of raw bytes at an odd offset are not)."""
        if array.dtype != dtype:
            return array.astype(dtype)
        return array if array.flags.aligned else array.copy()

    def empty_like(self, array: Any) -> Any:
        # Subclasses (memmap, masked arrays) keep np.empty_like, which preserves them.
        if array.nbytes < CACHED_BYTES or type(array) is not np.ndarray:
            return np.empty_like(array)
        strides = dense_strides(array.shape, array.strides)
        result = _core.cached_numpy(array.shape, strides, self.dtype_name(array))
        return result.view(array.dtype) if is_bfloat16(array.dtype) else result

    def empty(self, shape: tuple[int, ...], name: str, device: Device) -> Any:
        return np.empty(shape, numpy_dtype(name))

    def kernel(self, array: Any) -> Any:
        """The object the extension reads. NumPy has no bfloat16 of its own and cannot export
        ml_dtypes' through DLPack, so such arrays travel as their 16-bit pattern: the extension
        reads every uint16 array as bfloat16 (integer data never reaches it uncast)."""
        if is_bfloat16(array.dtype):
            return array.view(np.uint16)
        return array

    def check_out(self, out: Any) -> None:
        """Rejects an `out=` array the kernels cannot write."""
        if not out.flags.writeable:
            raise ValueError("out: the array is read-only")

    def span(self, array: Any) -> tuple[int, int]:
        """The byte range [low, high) the array's elements occupy."""
        interface = array.__array_interface__
        strides = array.strides
        return _bounds(interface["data"][0], tuple(array.shape), tuple(strides), array.itemsize)

    def broadcast_to(self, array: Any, shape: tuple[int, ...]) -> Any:
        return np.broadcast_to(array, shape)

    def all_binary(self, array: Any) -> bool:
        return bool(((array == 0) | (array == 1)).all())

    def stream(self, device: Device) -> int:
        """The CUDA stream the library orders its work on (0: the legacy default stream)."""
        return 0

    def before(self, arrays: list[Any]) -> None:
        """Makes the library's pending work on `arrays` visible to the kernels' stream."""

    def finish(self, result: Any, device: Device) -> Any:
        """The array handed back to the caller for a result the layer allocated."""
        return result

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)


def dense_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[int]:
    """Element strides of a dense array of `shape` whose axes are laid out in the order of
    `strides` (any unit; largest first, ties kept in axis order): the layout `np.empty_like` and
    `torch.empty_like` give, so that a cached result has the input's memory layout and the
    kernels walk both alike."""
    order = sorted(range(len(shape)), key=lambda axis: -abs(strides[axis]))
    result = [0] * len(shape)
    step = 1
    for axis in reversed(order):
        result[axis] = step
        step *= max(shape[axis], 1)
    return result


def _bounds(pointer: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int):
    """Byte range [low, high) an array's elements span (strides in bytes)."""
    low = high = pointer
    for size, stride in zip(shape, strides):
        if size == 0:
            return pointer, pointer
        if stride > 0:
            high += (size - 1) * stride
        else:
            low += (size - 1) * stride
    return low, high + itemsize


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[0] != a[1] and b[0] != b[1]


def check_no_overlap(out: Any, others: dict[str, Any]) -> None:
    """Raises if `out` shares memory with any of `others` (name -> array or None): the kernels
    read their inputs while they write, so a result that overlaps an input (x, dy or the mask)
    would be computed from partly overwritten data. Two NumPy arrays are compared exactly
    (interleaved views that never touch pass); others by the byte ranges they span."""
    out_framework = framework_of(out)
    for name, other in others.items():
        if other is None:
            continue
        other_framework = framework_of(other)
        if out_framework is _NUMPY and other_framework is _NUMPY:
            overlapping = np.shares_memory(out, other)
        elif out_framework.device(out) != other_framework.device(other):
            continue
        else:
            overlapping = _overlap(out_framework.span(out), other_framework.span(other))
        if overlapping:
            raise ValueError(f"out: must not overlap {name}")


class TorchFramework(Framework):
    label = "PyTorch"
    allocates_device_memory = True

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self._dtypes: dict[Any, np.dtype] = {}
        # Tensor dtypes with a NumPy counterpart (bfloat16 has none).
        self._numpy_readable = frozenset([torch.float16, torch.float32, torch.float64])

    def dtype(self, array: Any) -> np.dtype:
        """The NumPy dtype of a tensor (bfloat16 from ml_dtypes)."""
        dtype = self._dtypes.get(array.dtype)
        if dtype is None:
            dtype = self._dtypes[array.dtype] = numpy_dtype(self.dtype_name(array))
        return dtype

    def dtype_name(self, array: Any) -> str:
        return str(array.dtype).rpartition(".")[2]

    def device(self, array: Any) -> Device:
        device = array.device
        if device.type == "cpu":
            return CPU
        if device.type == "cuda":
            return Device("cuda", device.index or 0)
        raise ValueError(f"arrays must live on the CPU or a CUDA device, got a tensor on {device}")

    def cast(self, array: Any, dtype: np.dtype) -> Any:
        if self.dtype(array) == dtype:
            return array
        return array.to(getattr(self.torch, dtype.name))

    def empty_like(self, array: Any) -> Any:
        # Tensor subclasses keep torch.empty_like, which preserves them.
        cached = type(array) is self.torch.Tensor and array.device.type == "cpu"
        if not cached or array.nbytes < CACHED_BYTES:
            return self.torch.empty_like(array)
        shape = tuple(array.shape)
        strides = dense_strides(shape, array.stride())
        return _core.cached_torch(shape, strides, self.dtype_name(array))

    def empty(self, shape: tuple[int, ...], name: str, device: Device) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, name), device=str(device))

    def kernel(self, array: Any) -> Any:
        # DLPack refuses tensors that require grad; detach() is a view of the same memory.
        tensor = array.detach() if array.requires_grad else array
        if tensor.dtype in self._numpy_readable and self.device(tensor) is CPU:
            # A CPU tensor's NumPy view (same memory, same strides) reaches the extension
            # through the buffer protocol at a fraction of the cost of torch's __dlpack__,
            # which small calls pay once per array. Tensors NumPy cannot view (neg or conj
            # bits, exotic subclasses) travel through DLPack.
            try:
                return tensor.numpy()
            except (RuntimeError, TypeError):
                pass
        return tensor

    def span(self, array: Any) -> tuple[int, int]:
        size = array.element_size()
        strides = tuple(s * size for s in array.stride())
        return _bounds(array.data_ptr(), tuple(array.shape), strides, size)

    def check_out(self, out: Any) -> None:
        pass  # torch tensors are always writable

    def broadcast_to(self, array: Any, shape: tuple[int, ...]) -> Any:
        return self.torch.broadcast_to(array, shape)

    def all_binary(self, array: Any) -> bool:
        # The check reads the values on the host, which a CUDA graph capture cannot do.
        if array.is_cuda and self.torch.cuda.is_current_stream_capturing():
            raise ValueError(
                "mask: a non-boolean mask is checked on the host, which a CUDA graph capture "
                "does not allow; pass a boolean mask"
            )
        return super().all_binary(array)

    def stream(self, device: Device) -> int:
        return self.torch.cuda.current_stream(device.index).cuda_stream

    def to_numpy(self, array: Any) -> np.ndarray:
        array = array.detach().cpu()
        if array.dtype == self.torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            array = array.float()
        return array.numpy()


class CupyFramework(Framework):
    label = "CuPy"
    allocates_device_memory = True

    def __init__(self, cupy: Any) -> None:
        self.cupy = cupy

    def device(self, array: Any) -> Device:
        return Device("cuda", array.device.id)

    def empty_like(self, array: Any) -> Any:
        return self.cupy.empty_like(array)

    def empty(self, shape: tuple[int, ...], name: str, device: Device) -> Any:
        with self.cupy.cuda.Device(device.index):
            return self.cupy.empty(shape, numpy_dtype(name))

    def kernel(self, array: Any) -> Any:
        return array

    def span(self, array: Any) -> tuple[int, int]:
        return _bounds(array.data.ptr, tuple(array.shape), tuple(array.strides), array.itemsize)

    def check_out(self, out: Any) -> None:
        pass  # CuPy arrays are always writable

    def broadcast_to(self, array: Any, shape: tuple[int, ...]) -> Any:
        return self.cupy.broadcast_to(array, shape)

    def stream(self, device: Device) -> int:
        with self.cupy.cuda.Device(device.index):
            return self.cupy.cuda.get_current_stream().ptr

    def to_numpy(self, array: Any) -> np.ndarray:
        return self.cupy.asnumpy(array)


class JaxFramework(Framework):
    """JAX arrays are immutable: results are computed into buffers the layer allocates (NumPy on
    the CPU, the extension's device memory on CUDA) and handed to JAX through DLPack."""

    label = "JAX"

    def __init__(self, jax: Any) -> None:
        self.jax = jax

    def device(self, array: Any) -> Device:
        kind, index = array.__dlpack_device__()
        return _dlpack_device(int(kind), int(index))

    def cast(self, array: Any, dtype: np.dtype) -> Any:
        # JAX buffers are always aligned (and have no NumPy `flags`).
        return array if array.dtype == dtype else array.astype(dtype)

    def empty_like(self, array: Any) -> Any:
        return self.empty(tuple(array.shape), self.dtype_name(array), self.device(array))

    def empty(self, shape: tuple[int, ...], name: str, device: Device) -> Any:
        if device.type == "cpu":
            return np.empty(shape, numpy_dtype(name))
        return DeviceArray(shape, name, device)

    def kernel(self, array: Any) -> Any:
        if isinstance(array, np.ndarray):  # a result buffer before it is handed to JAX
            return Framework.kernel(self, array)
        return array  # a JAX array or a DeviceArray result buffer, read through DLPack

    def check_out(self, out: Any) -> None:
        raise TypeError("out: JAX arrays are immutable; call without out= to get a new array")

    def span(self, array: Any) -> tuple[int, int]:
        if isinstance(array, np.ndarray):  # a result buffer before it is handed to JAX
            return Framework.span(self, array)
        pointer = array.unsafe_buffer_pointer()  # JAX buffers are dense, row-major
        return pointer, pointer + array.size * array.dtype.itemsize

    def broadcast_to(self, array: Any, shape: tuple[int, ...]) -> Any:
        # JAX materializes broadcasts, while the kernels need the mask as a view with stride 0
        # along the features: take that view through a library that has strided views.
        if self.device(array).type == "cpu":
            return np.broadcast_to(np.asarray(array), shape)
        for name in ("torch", "cupy"):
            if name in sys.modules or _importable(name):
                library = sys.modules[name]
                # The view belongs to the other library, whose `before` does not wait for JAX.
                array.block_until_ready()
                return library.broadcast_to(library.from_dlpack(array), shape)
        raise TypeError(
            "mask: a JAX mask on CUDA is viewed through PyTorch or CuPy; install one of them or "
            "pass the mask as a PyTorch or CuPy array"
        )

    def before(self, arrays: list[Any]) -> None:
        # JAX computes on its own streams; the kernels run on the default stream after it.
        for array in arrays:
            if isinstance(array, self.jax.Array):
                array.block_until_ready()

    def finish(self, result: Any, device: Device) -> Any:
        if device.type == "cuda":
            _core.cuda_synchronize(device.index)
        elif is_bfloat16(result.dtype):  # NumPy cannot export bfloat16 through DLPack: a copy
            return self.jax.numpy.asarray(result)
        return self.jax.dlpack.from_dlpack(result)


_NUMPY = Framework()
_cache: dict[str, Framework] = {}


def _library(name: str, kind: type[Framework]) -> Framework:
    framework = _cache.get(name)
    if framework is None:
        framework = _cache[name] = kind(sys.modules[name])
    return framework


def _dlpack_device(kind: int, index: int) -> Device:
    if kind == _DLPACK_CPU:
        return CPU
    if kind == _DLPACK_CUDA:
        return Device("cuda", index)
    raise ValueError(f"arrays must live on the CPU or a CUDA device (DLPack device type {kind})")


def framework_of(array: Any) -> Framework:
    """The framework of an array `read` returned."""
    if isinstance(array, np.ndarray):
        return _NUMPY
    modules = sys.modules
    if "torch" in modules and isinstance(array, modules["torch"].Tensor):
        return _library("torch", TorchFramework)
    if "cupy" in modules and isinstance(array, modules["cupy"].ndarray):
        return _library("cupy", CupyFramework)
    if "jax" in modules and isinstance(array, modules["jax"].Array):
        if isinstance(array, modules["jax"].core.Tracer):
            raise TypeError(
                "a JAX tracer reached batchnorm's eager layer, which computes on concrete "
                "arrays only: under jax.jit, jax.grad or jax.vmap use batchnorm.jax "
                "(batch_norm, or the Flax module batchnorm.jax.BatchNormalization)"
            )
        return _library("jax", JaxFramework)
    return _NUMPY


def read(value: Any, what: str) -> Any:
    """`value` as an array of a supported framework, read in place: NumPy, PyTorch, CuPy and
    JAX arrays as they are, other DLPack producers through NumPy (CPU) or through PyTorch or
    CuPy (CUDA), and lists or scalars as NumPy arrays."""
    if isinstance(value, np.ndarray) or framework_of(value) is not _NUMPY:
        return value
    if hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
        try:
            device = _dlpack_device(*(int(v) for v in value.__dlpack_device__()))
            if device.type == "cpu":
                return np.from_dlpack(value)
            for name in ("torch", "cupy"):
                if name in sys.modules or _importable(name):
                    return sys.modules[name].from_dlpack(value)
        except (BufferError, RuntimeError, TypeError) as error:
            raise TypeError(f"{what}: cannot read this array through DLPack ({error})") from error
        raise TypeError(
            f"{what}: a {type(value).__name__} on {device} can be read through PyTorch or CuPy; "
            "install one of them, or pass a PyTorch, CuPy or JAX array"
        )
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what}: expected an array, got {type(value).__name__}") from error


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def check_numeric(array: Any, what: str) -> None:
    """Rejects dtypes Keras would not normalize (complex, object, strings, datetimes)."""
    name = framework_of(array).dtype_name(array)
    if not name.startswith(_REAL_PREFIXES):
        raise TypeError(
            f"{what}: dtype {name} is not a real number type; batch normalization needs "
            "floating-point (or integer/bool, converted) data"
        )


def to_numpy(value: Any) -> np.ndarray:
    """A host NumPy copy (or view, on the CPU) of any supported array or array-like."""
    array = read(value, "value")
    return framework_of(array).to_numpy(array)


class DeviceArray:
    """A C-contiguous array in CUDA memory that the extension allocated (freed with this
    object), with the shape, dtype name and device that the extension's bare buffer does not
    carry. It exports DLPack, so the kernels and every framework read it in place."""

    __slots__ = ("buffer", "shape", "dtype_name", "device", "ordered")

    def __init__(
        self, shape: tuple[int, ...], dtype_name: str, device: Device, ordered: bool = False
    ) -> None:
        # `ordered`: a call's own vector, allocated in the call's stream order and freed in
        # stream order after the work recorded by `mark_used` (no wait on the host).
        empty = _core.cuda_empty_on_stream if ordered else _core.cuda_empty
        self.buffer = empty(list(shape), dtype_name, device.index)
        self.shape = tuple(shape)
        self.dtype_name = dtype_name
        self.device = device
        self.ordered = ordered

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.buffer.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return _DLPACK_CUDA, self.device.index


def device_vector(values: np.ndarray, device: Device) -> Any:
    """A contiguous 1-D copy of host `values` on `device`, for the kernels' per-feature inputs:
    a NumPy array on the CPU, a DeviceArray on CUDA."""
    host = np.ascontiguousarray(values).reshape(-1)
    if device.type == "cpu":
        return host.copy()
    vector = DeviceArray((host.size,), host.dtype.name, device)
    _core.cuda_copy(vector.buffer, host)
    return vector


def stream_vector(values: np.ndarray, device: Device) -> Any:
    """`device_vector` inside a call, once its stream is set: on CUDA the copy is queued on the
    call's stream, ordered before the kernels that read it, and the host does not wait."""
    host = np.ascontiguousarray(values).reshape(-1)
    if device.type == "cpu":
        return host.copy()
    vector = DeviceArray((host.size,), host.dtype.name, device, ordered=True)
    _core.cuda_copy_on_stream(vector.buffer, host)
    _core.cuda_used(vector.buffer)
    return vector


def mark_used(vectors: Any) -> None:
    """Records that the work just queued on the call's stream reads these vectors (None and
    host vectors are skipped): a call's own device vectors are freed only after it."""
    for vector in vectors:
        if isinstance(vector, DeviceArray) and vector.ordered:
            _core.cuda_used(vector.buffer)


def copy_vector(vector: Any) -> Any:
    """An independent copy of a `device_vector`, on its device; inside a call, once its stream is
    set: on CUDA the copy is queued on the call's stream (after the kernels that may update the
    vector), and the host does not wait."""
    if isinstance(vector, np.ndarray):
        return vector.copy()
    copy = DeviceArray(vector.shape, vector.dtype_name, vector.device, ordered=True)
    _core.cuda_copy_on_stream(copy.buffer, vector.buffer)
    _core.cuda_used(copy.buffer)
    return copy


def vector_to_host(vector: Any) -> np.ndarray:
    """A host copy of a `device_vector`."""
    if isinstance(vector, np.ndarray):
        return vector.copy()
    host = np.empty(vector.shape, numpy_dtype(vector.dtype_name))
    _core.cuda_copy(host, vector.buffer)
    return host


def assign_vector(vector: Any, values: np.ndarray) -> None:
    """Overwrites a `device_vector` with host values of the same size."""
    if isinstance(vector, np.ndarray):
        vector[...] = values
    else:
        _core.cuda_copy(vector.buffer, np.ascontiguousarray(values, dtype=values.dtype))
