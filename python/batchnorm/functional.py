"""Stateless batch normalization: the call contract every layer of this package stands on.

`forward` normalizes an array with explicit weights and returns, next to the result, the
`Context` that its `backward` needs. Nothing is kept between calls, so each call is
differentiated with its own statistics, however often the same weights are used. The layers
(`batchnorm.BatchNormalization` and the framework adapters) hold state only: the weights, the
last context, the dtype policy.

Weights are a mapping from Keras' weight names (`gamma`, `beta`, `moving_mean`,
`moving_variance`, and with renorm `moving_stddev`, `renorm_mean`, `renorm_stddev`) to flat,
contiguous vectors of C values on the data's device, float32 (float64 for float64 data), or
those vectors bound once with `Weights(**mapping)` — checked when bound instead of on every
call, which is what a layer calling many times does. A training forward updates the moving
statistics in place.

    >>> import numpy as np
    >>> from batchnorm import functional as F
    >>> options = F.Options(axis=-1, momentum=0.9)
    >>> weights = F.initial_weights(options, (8, 3))
    >>> x = np.arange(24, dtype=np.float32).reshape(8, 3)
    >>> y, context = F.forward(x, weights, options, training=True)
    >>> dx, dgamma, dbeta = F.backward(np.ones_like(x), context)
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _core
from ._arrays import (
    _NUMPY,
    Device,
    _dlpack_device,
    check_no_overlap,
    check_numeric,
    copy_vector,
    framework_of,
    mark_used,
    read,
    stream_vector,
)

Weights = _core.Weights

_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _axis(axis: Any) -> int | list[int]:
    def is_int(a: Any) -> bool:
        return isinstance(a, numbers.Integral) and not isinstance(a, bool)

    if is_int(axis):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(is_int(a) for a in axis):
        return [int(a) for a in axis]
    raise TypeError(f"axis must be an int or a non-empty list/tuple of ints, got {axis!r}")


def _clipping(clipping: Any) -> dict[str, float] | None:
    if clipping is None:
        return None
    if not isinstance(clipping, Mapping):
        raise TypeError(f"renorm_clipping must be a dict or None, got {clipping!r}")
    unknown = set(clipping) - set(_CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"renorm_clipping: unknown keys {sorted(unknown)}; allowed: {list(_CLIPPING_KEYS)}"
        )
    return {
        key: _number(value, f"renorm_clipping[{key!r}]")
        for key, value in clipping.items()
        if value is not None
    }


def _ghost_batch_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"virtual_batch_size must be an int or None, got {value!r}")
    if value == 0:  # the core reads 0 as "no ghost batches"; Keras spells that None
        raise ValueError("virtual_batch_size must be a positive int or None, got 0")
    return int(value)


# The core's option fields that Python spells differently: `axis` (an int or a list) for
# `axes`, Keras' `renorm_clipping` dict for the three bounds, and None for "no ghost batches".
_SPELLED_IN_PYTHON = {"axes": "axis", "rmin": "renorm_clipping", "rmax": None, "dmax": None}
_DEFAULTS = _core.Options()
# Every scalar option the core has, under its own name: a new core field needs nothing here.
_SCALAR_FIELDS = tuple(
    name
    for name in dir(_core.Options)
    if not name.startswith("_") and name not in _SPELLED_IN_PYTHON
)
FIELDS = ("axis", "renorm_clipping") + _SCALAR_FIELDS


def _scalar(name: str, value: Any) -> Any:
    """A scalar option checked against the type of the core's default."""
    if name == "virtual_batch_size":
        return _ghost_batch_size(value)
    default = getattr(_DEFAULTS, name)
    if isinstance(default, bool):
        return _flag(value, name)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        return int(value)
    return _number(value, name)


class Options:
    """The hyper-parameters of batch normalization, by the names and with the defaults of
    Keras' layer (`axis`, `momentum`, `epsilon`, `center`, `scale`, `renorm`,
    `renorm_momentum`, `renorm_clipping`, `virtual_batch_size`). Types are checked here
    (`TypeError`), ranges by the core (`ValueError`: one set of rules for every language); the
    value is then frozen — `replace` makes a changed, again validated, copy."""

    __slots__ = ("_values", "core", "json")
    core: Any  # the validated _core.Options the kernels read
    json: str  # every option as one JSON string: `Options.from_json(options.json)` rebuilds them

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(FIELDS)
        if unknown:
            raise TypeError(
                f"unknown options {sorted(unknown)}; the options are {', '.join(FIELDS)}"
            )
        values = {"axis": _axis(options.get("axis", -1))}
        values["renorm_clipping"] = _clipping(options.get("renorm_clipping"))
        core = _core.Options()
        for name in _SCALAR_FIELDS:
            if name in options:
                values[name] = _scalar(name, options[name])
                setattr(core, name, 0 if values[name] is None else values[name])
            else:
                values[name] = None if name == "virtual_batch_size" else getattr(core, name)
        core.axes = values["axis"] if isinstance(values["axis"], list) else [values["axis"]]
        clipping = values["renorm_clipping"] or {}
        core.rmin = clipping.get("rmin", -math.inf)
        core.rmax = clipping.get("rmax", math.inf)
        core.dmax = clipping.get("dmax", math.inf)
        _core.validate(core)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "core", core)
        # Keyed by this string, the options pass where only plain values go (framework ops).
        object.__setattr__(self, "json", json.dumps(values, sort_keys=True))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            value = values[name]
            return dict(value) if isinstance(value, dict) else value
        raise AttributeError(f"Options has no option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Options are frozen: use options.replace({name}=...)")

    @staticmethod
    def from_json(text: str) -> Options:
        """The options whose `json` is `text` (cached: frameworks look them up per call)."""
        return _options_from_json(text)

    def replace(self, **changes: Any) -> Options:
        """A copy with `changes` applied, validated like a new one."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise TypeError(f"Options has no {', '.join(sorted(unknown))}")
        return Options(**{**self._values, **changes})

    def as_dict(self) -> dict[str, Any]:
        """Every option by name (a copy)."""
        return {name: getattr(self, name) for name in FIELDS}

    def weight_names(self) -> list[str]:
        """The weights these options give, in Keras order."""
        return list(_core.weight_names(self.core))

    def input_shape_for(self, feature_shape: Sequence[int]) -> list[int]:
        """The smallest input shape with `feature_shape` (the feature sizes, in ascending axis
        order, as `schema(...).feature_shape` gives them) on the feature axes, 1 elsewhere: what
        a layer given only its feature sizes builds for."""
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        if len(axes) != len(feature_shape):
            raise ValueError(
                f"feature shape {tuple(feature_shape)} gives {len(feature_shape)} sizes for the "
                f"{len(axes)} feature axes {self.axis}"
            )
        rank = max(max(a + 1 if a >= 0 else -a for a in axes), 1)
        shape = [1] * rank
        for axis, size in zip(sorted(a % rank for a in axes), feature_shape):
            shape[axis] = int(size)
        return shape

    def schema(self, input_shape: Sequence[int | None]) -> Any:
        """The resolved feature axes, their sizes, the feature count, Keras' weight shape and
        the weight names for inputs of `input_shape` (unknown sizes may be None)."""
        shape = [-1 if d is None else int(d) for d in input_shape]
        return _core.weight_schema(self.core, shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Options):
            return NotImplemented
        return self._values == other._values

    __hash__ = None  # type: ignore[assignment]  # holds a dict

    def __repr__(self) -> str:
        return "Options(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"


@functools.lru_cache(maxsize=256)
def _options_from_json(text: str) -> Options:
    return Options(**json.loads(text))


def initial_weights(
    options: Options, input_shape: Sequence[int | None], dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """Keras' default initial weights (gamma 1, beta 0, moving mean 0, moving variance 1; the
    renorm statistics from them) as flat NumPy vectors of `dtype`."""
    schema = options.schema(input_shape)
    start = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
    start.update(moving_stddev=1.0, renorm_mean=0.0, renorm_stddev=1.0)
    return {name: np.full(schema.features, start[name], dtype) for name in schema.names}


class Context:
    """What `backward` needs from one `forward` call: the call's input and mask (read again,
    not copied: keep them unchanged), its statistics, and the weights as they were then (so a
    later update of gamma cannot change this call's gradient)."""

    __slots__ = (
        "training",
        "x",
        "mask",
        "options",
        "weights",
        "statistics",
        "communicator",
        "storage",
    )

    def __init__(
        self,
        training: bool,
        x: Any,
        mask: Any,
        options: Options,
        weights: Weights,
        statistics: Any,
        communicator: Any,
        storage: Any = None,
    ) -> None:
        self.training = training
        self.x = x
        self.mask = mask
        self.options = options
        self.weights = weights
        self.statistics = statistics
        self.communicator = communicator
        # The device array that holds a CUDA training call's statistics (kept alive with them).
        self.storage = storage


def _ghost_groups(options: Options, shape: Sequence[int]) -> int:
    size = options.virtual_batch_size
    return shape[0] // size if size and shape[0] else 1


def packed_size(options: Options, input_shape: Sequence[int]) -> int:
    """The length of `context.statistics.pack()` for a training call on `input_shape`."""
    features = options.schema(list(input_shape)).features
    return 3 * _ghost_groups(options, input_shape) * features + 2 * features


def training_context(
    x: Any,
    mask: Any,
    weights: Mapping[str, Any] | Weights,
    options: Options,
    packed: Any,
    communicator: Any = None,
) -> Context:
    """The Context of a training `forward` on `x` (and `mask`, as given to it) rebuilt from its
    packed statistics (`context.statistics.pack()`, a host float64 vector, or on CUDA the
    forward's `context.storage`, read in place), for frameworks that keep a call's state as
    arrays: its `backward` is the original call's. The training backward reads gamma, and of
    beta only whether it exists."""
    mask_view = prepare_mask(mask, x, True, framework_of(x).device(x))
    layout = (
        _ghost_groups(options, x.shape),
        options.schema(list(x.shape)).features,
        mask_view is not None,
        options.virtual_batch_size is not None,
    )
    packed_framework = framework_of(packed)
    if packed_framework.device(packed).type == "cuda":
        # A CUDA forward's statistics_storage: read where it is, never through the host.
        view = packed_framework.kernel(packed)
        statistics = _core.TrainingContext.in_device_storage(view, *layout)
        return Context(True, x, mask_view, options, bind(weights), statistics, communicator, packed)
    statistics = _core.TrainingContext.unpack(packed, *layout)
    return Context(True, x, mask_view, options, bind(weights), statistics, communicator)


def prepare_mask(mask: Any, x: Any, training: bool, device: Device) -> Any:
    """The mask as a boolean view of x's shape (stride 0 where it broadcasts), in the mask's
    own framework; None at inference, where the mask is not used (only its rank is checked).

    Two forms are accepted. Keras' own: rank `x.ndim - 1`, aligned with x's leading axes and
    broadcast along the last axis, whatever the feature axes are (on `(B, C, T)` with axis=1 a
    `(B, C)` mask selects whole (sample, channel) rows). And this package's general form: x's
    full rank, each dimension x's size or 1 (e.g. `(B, 1, H, W)` for per-pixel masks on
    NCHW)."""
    if mask is None:
        return None
    array = read(mask, "mask")
    shape = tuple(array.shape)
    rank = len(x.shape)
    if len(shape) not in (rank - 1, rank):
        raise ValueError(
            f"mask: shape {shape} has rank {len(shape)}, but an input of rank {rank} takes "
            f"a mask of rank {rank - 1} (Keras' form: the input's leading axes, broadcast "
            f"along the last axis) or of rank {rank} (each dimension the input's or 1)"
        )
    if not training:
        return None
    framework = framework_of(array)
    _check_device(framework.device(array), device, "the mask")
    if framework.dtype_name(array) != "bool":
        check_numeric(array, "mask")
        if not framework.all_binary(array):
            raise ValueError("mask: values must be booleans or 0/1")
        array = framework.cast(array, np.dtype(bool))
    full = shape + (1,) if len(shape) == rank - 1 else shape
    if any(m not in (1, n) for m, n in zip(full, x.shape)):
        form = (
            "Keras aligns a mask of rank input rank - 1 with the input's leading axes"
            if len(shape) == rank - 1
            else "each dimension must be the input's or 1"
        )
        raise ValueError(
            f"mask: shape {shape} does not fit the input shape {tuple(x.shape)} ({form})"
        )
    return framework.broadcast_to(array.reshape(full), tuple(x.shape))


def _check_device(device: Device, weights_device: Device, what: str) -> None:
    if device != weights_device:
        raise ValueError(
            f"{what} is on {device} but the weights are on {weights_device}; move the layer "
            f"with layer.to({str(device)!r}) or the array to {weights_device}"
        )


def _output(framework: Any, x: Any, out: Any, inputs: dict[str, Any]) -> Any:
    """The array the kernels write: a new one like x from x's `framework`, or `out` checked
    against x and the call's `inputs` (name -> array or None), which it must not overlap. A
    NumPy `out` that is not aligned to its item size gets an aligned stand-in, copied into it
    by `_deliver`."""
    if out is None:
        return framework.empty_like(x)
    if framework_of(out) is not framework or (
        isinstance(x, np.ndarray) and not isinstance(out, np.ndarray)
    ):
        raise TypeError(
            f"out must be a {framework.label} array like the input, got {type(out).__name__}"
        )
    expected = (tuple(x.shape), framework.dtype_name(x))
    got = (tuple(out.shape), framework.dtype_name(out))
    if got != expected:
        raise ValueError(
            f"out: expected shape {expected[0]} and dtype {expected[1]}, got {got[0]} {got[1]}"
        )
    if framework.device(out) != framework.device(x):
        raise ValueError(
            f"out: is on {framework.device(out)} but the input is on {framework.device(x)}"
        )
    framework.check_out(out)
    check_no_overlap(out, inputs)
    if isinstance(out, np.ndarray) and not out.flags.aligned:
        return np.empty_like(x)
    return out


def _deliver(framework: Any, result: Any, out: Any, device: Device) -> Any:
    """What a call returns: `out` when given (filled), else the new result array."""
    if out is None:
        return framework.finish(result, device)
    if result is not out:  # the aligned stand-in for a misaligned NumPy `out`
        out[...] = result
    return out


def _on_stream(framework: Any, device: Device, arrays: list[Any]) -> None:
    """Orders the kernels after the caller's work: on x's framework's current CUDA stream, after
    the work each array's own framework has queued for it (a CuPy mask or a JAX `dy` beside
    PyTorch tensors is made on another stream, which the kernels' stream waits for)."""
    if device.type != "cuda":
        return
    stream = framework.stream(device)
    _core.set_cuda_stream(stream)
    for array in arrays:
        if array is None:
            continue
        owner = framework_of(array)
        owner.before([array])
        if owner is not framework:
            producer = owner.stream(device)
            if producer != stream:
                _core.cuda_wait_stream(producer, device.index)


def _device_adjustment(vector: Any, device: Device) -> Any:
    """An adjustment vector on the weights' device: host NumPy values go up in the call's stream
    order."""
    if isinstance(vector, np.ndarray) and device.type == "cuda":
        return stream_vector(vector, device)
    return vector


# What each backward reads of its forward call's weights (a copy keeps them), as the extension's
# plain calls keep them.
_READ_BY_TRAINING_BACKWARD = _core.kept_for_backward(True)
_READ_BY_INFERENCE_BACKWARD = _core.kept_for_backward(False)


def bind(weights: Mapping[str, Any] | Weights) -> Weights:
    """The weights bound for the kernels: a `Weights` as it is, a mapping bound now."""
    return weights if isinstance(weights, Weights) else Weights(**weights)


def _weights_device(weights: Weights) -> Device:
    return _dlpack_device(*weights.device)


def _snapshot(weights: Weights, names: list[str], framework: Any, device: Device) -> Weights:
    """`weights` with the vectors `names` copied as they are now; on CUDA, inside a call once its
    stream is set. Device copies belong to the input's framework where it allocates device
    memory (PyTorch, CuPy): freed with the context by that framework, and in a CUDA graph
    capture taken from the graph's memory, so that a captured step frees nothing it allocated
    on a later step."""
    if device.type == "cpu":  # the weights' device, which the caller resolved
        return weights.snapshot(names)

    def copy(vector: Any) -> Any:
        if not framework.allocates_device_memory:
            return copy_vector(vector)
        kept = framework.empty((weights.features,), weights.dtype, device)
        _core.cuda_copy_on_stream(kept, vector)
        return kept

    return Weights(
        **{
            name: copy(weights.vector(name)) if name in names else weights.vector(name)
            for name in weights.names
        }
    )


def forward(
    x: Any,
    weights: Mapping[str, Any] | Weights,
    options: Options,
    *,
    training: bool,
    mask: Any = None,
    adjustment: tuple[Any, Any] | None = None,
    update_moving: bool = True,
    out: Any = None,
    communicator: Any = None,
) -> tuple[Any, Context]:
    """Normalizes `x` (any supported array, read in place; float16, bfloat16, float32 or
    float64) and returns the result in x's framework with the `Context` of this call.

    training=True uses the batch (or ghost-batch, masked) statistics and, with
    `update_moving`, updates the moving statistics in `weights` in place; training=False uses
    the moving statistics. `adjustment` is Keras' (scale, bias) as per-feature vectors of the
    weights' dtype, on their device or as host NumPy arrays (copied in the call's stream
    order); `communicator` a core reduction hook for synchronized
    statistics; `out` an array like x to write into."""
    if (
        type(x) is np.ndarray
        and mask is None
        and adjustment is None
        and (out is None or type(out) is np.ndarray)
        and type(weights) is Weights
    ):
        # The common call, NumPy on the CPU: one C++ call keeps the weights the backward reads,
        # makes the statistics and runs the kernel (None where x or the weights are not that
        # case, e.g. bfloat16 data or CUDA weights, which the general path below takes).
        y = _NUMPY.empty_like(x) if out is None else out
        kept = _core.plain_forward(
            x, y, training, update_moving, options.core, weights, communicator, None, None
        )
        if kept is not None:
            return y, Context(training, x, None, options, kept[0], kept[1], communicator)
    framework = framework_of(x)
    weights = bind(weights)
    device = _weights_device(weights)
    _check_device(framework.device(x), device, "the input")
    mask_view = prepare_mask(mask, x, training, device)
    y = _output(framework, x, out, {"the input": x, "the mask": mask_view})
    _on_stream(framework, device, [x, mask_view] if training else [x])
    if adjustment is not None:
        adjustment = (
            _device_adjustment(adjustment[0], device),
            _device_adjustment(adjustment[1], device),
        )
    context = _run_forward(
        x,
        framework.kernel(x),
        framework.kernel(y),
        mask_view,
        weights,
        options,
        training,
        adjustment,
        update_moving,
        communicator,
        framework,
        device,
    )
    return _deliver(framework, y, out, device), context


def _run_forward(
    x: Any,
    x_view: Any,
    y_view: Any,
    mask_view: Any,
    weights: Weights,
    options: Options,
    training: bool,
    adjustment: tuple[Any, Any] | None,
    update_moving: bool,
    communicator: Any,
    framework: Any,
    device: Device,
) -> Context:
    """The kernels of `forward` on resolved views (x_view read, y_view written), and the
    call's Context."""
    storage = None
    if training:
        # The training backward reads gamma only: keep this call's value (copied first, so that
        # a backward ordered after the forward's statistics is ordered after the copy too).
        kept = _snapshot(weights, _READ_BY_TRAINING_BACKWARD, framework, device)
        statistics = _core.TrainingContext.pooled(weights.features)
        if device.type == "cuda" and framework.allocates_device_memory:
            # The statistics kept for backward live in an array of x's framework too.
            storage = framework.empty((packed_size(options, x.shape),), "float64", device)
        _core.train_forward(
            x=x_view,
            y=y_view,
            mask=mask_view,
            options=options.core,
            adjust_scale=None if adjustment is None else adjustment[0],
            adjust_bias=None if adjustment is None else adjustment[1],
            update_moving=update_moving,
            context=statistics,
            communicator=communicator,
            weights=weights,
            statistics_storage=storage,
        )
        if adjustment is not None:
            mark_used(adjustment)
    else:
        statistics = None
        _core.infer_forward(x=x_view, y=y_view, options=options.core, weights=weights)
        kept = _snapshot(weights, _READ_BY_INFERENCE_BACKWARD, framework, device)
    return Context(training, x, mask_view, options, kept, statistics, communicator, storage)


def backward(dy: Any, context: Context, *, out: Any = None) -> tuple[Any, Any, Any]:
    """Gradient of the call that made `context`: dx (in x's framework, or written into `out`)
    and dgamma, dbeta as flat vectors of the weights' dtype (None where the layer has no such
    weight). Renorm's r, d and the adjustment are constants, as in Keras."""
    x = context.x
    if (
        type(dy) is np.ndarray
        and type(x) is np.ndarray
        and (out is None or type(out) is np.ndarray)
    ):
        # The common call, NumPy on the CPU, in one C++ call (None, with nothing done, where dy
        # needs the general path's cast or error, or the call's weights are not on the host).
        dx = _NUMPY.empty_like(x) if out is None else out
        result = _core.plain_backward(
            dy,
            x,
            dx,
            context.mask,
            context.options.core,
            context.statistics,
            context.weights,
            context.communicator,
        )
        if result is not None:
            return result
    framework = framework_of(x)
    device = _weights_device(context.weights)
    dy_array = read(dy, "dy")
    check_numeric(dy_array, "dy")
    if tuple(dy_array.shape) != tuple(x.shape):
        raise ValueError(
            f"dy: expected shape {tuple(x.shape)} (the forward input's), got "
            f"{tuple(dy_array.shape)}"
        )
    dy_framework = framework_of(dy_array)
    _check_device(dy_framework.device(dy_array), device, "dy")
    dy_array = dy_framework.cast(dy_array, framework.dtype(x))
    dx = _output(framework, x, out, {"the input": x, "dy": dy_array, "the mask": context.mask})
    weights = context.weights
    options = context.options

    def gradient(present: bool) -> Any:
        return framework.empty((weights.features,), weights.dtype, device) if present else None

    dgamma = gradient(weights.has("gamma"))
    dbeta = gradient(weights.has("beta"))
    _on_stream(framework, device, [x, dy_array])
    views = {"dy": dy_framework.kernel(dy_array), "x": framework.kernel(x)}
    views["dx"] = framework.kernel(dx)
    for name, vector in (("dgamma", dgamma), ("dbeta", dbeta)):
        views[name] = None if vector is None else framework.kernel(vector)
    if context.training:
        _core.train_backward(
            **views,
            mask=context.mask,
            options=options.core,
            weights=weights,
            context=context.statistics,
            communicator=context.communicator,
        )
    else:
        _core.infer_backward(
            **views,
            options=options.core,
            weights=weights,
        )

    if device.type == "cuda":  # host vectors need no record (and each view costs a conversion)
        mark_used(weights.vector(name) for name in weights.names)

    def finish(vector: Any) -> Any:
        return None if vector is None else framework.finish(vector, device)

    return _deliver(framework, dx, out, device), finish(dgamma), finish(dbeta)


__all__ = [
    "Context",
    "Options",
    "Weights",
    "backward",
    "bind",
    "forward",
    "initial_weights",
    "packed_size",
    "prepare_mask",
    "training_context",
]
