"""`BatchNormalization`: the Keras layer (training, inference, moving statistics, masks, batch
renormalization, ghost batches, adjustment, regularizers, constraints and the backward pass) on
top of the compiled kernels in `batchnorm._core`."""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _core, _mpi, constraints, initializers, regularizers
from ._arrays import (
    CPU,
    Device,
    assign_vector,
    check_no_overlap,
    check_numeric,
    device_vector,
    framework_of,
    parse_device,
    read,
    to_numpy,
    vector_to_host,
)
from ._dtypes import Policy, data_dtype, numpy_dtype, policy_from

_layer_ids = itertools.count()
_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


class Variable:
    """A layer weight: Keras-shaped to the user, a flat contiguous vector on the layer's device
    to the kernels (a NumPy array on the CPU, a device buffer on CUDA)."""

    def __init__(self, name: str, layer: BatchNormalization, value: np.ndarray, trainable: bool):
        self.name = name
        self.path = f"{layer.name}/{name}"
        # Weak: the layer owns its variables, and a cycle would keep device buffers alive until
        # the garbage collector runs.
        self._layer = weakref.ref(layer)
        self._shape = tuple(value.shape)
        self._dtype = np.dtype(value.dtype)
        self._size = int(value.size)
        self._device = CPU
        self._storage: Any = np.ascontiguousarray(value, dtype=value.dtype).reshape(-1).copy()
        self._trainable = trainable

    @property
    def trainable(self) -> bool:
        return self._trainable

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def device(self) -> str:
        return str(self._device)

    def numpy(self) -> np.ndarray:
        """A host copy of the value in the Keras weight shape."""
        return vector_to_host(self._storage, self._size, self._dtype).reshape(self._shape)

    @property
    def value(self) -> np.ndarray:
        return self.numpy()

    @property
    def constraint(self) -> Any:
        """The constraint the layer applies to this weight after each update (Keras'
        `variable.constraint`): the layer's `gamma_constraint` / `beta_constraint`, read live;
        None for the moving statistics (and once the layer is gone)."""
        return self._layer_attribute("constraint")

    @property
    def regularizer(self) -> Any:
        """The layer's `gamma_regularizer` / `beta_regularizer` for this weight (Keras'
        `variable.regularizer`); None for the moving statistics."""
        return self._layer_attribute("regularizer")

    def _layer_attribute(self, kind: str) -> Any:
        layer = self._layer()
        if layer is None or self.name not in ("gamma", "beta"):
            return None
        return getattr(layer, f"{self.name}_{kind}")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        value = self.numpy()
        return value if dtype is None else value.astype(dtype)

    def assign(self, value: Any) -> None:
        """Overwrites the value with an array of the same number of elements (any layout)."""
        array = np.asarray(to_numpy(value), dtype=self._dtype)
        if array.size != self._size:
            raise ValueError(
                f"{self.path}: expected {self._size} values (shape {self._shape}), got "
                f"an array of shape {array.shape}"
            )
        assign_vector(self._storage, array.reshape(-1))

    def _move(self, device: Device) -> None:
        if device != self._device:
            self._storage = device_vector(self.numpy(), device)
            self._device = device

    def __repr__(self) -> str:
        return f"<Variable path={self.path} shape={self._shape} dtype={self.dtype.name}>"


def build_input_shape(build_config: Any) -> tuple[int | None, ...] | None:
    """The input shape in a Keras `build_config` (`{"input_shape": [...]}`), or None when there
    is none (absent, or Keras' `{"input_shape": None}` for a layer that was never built)."""
    if build_config is None:
        return None
    if not isinstance(build_config, Mapping):
        raise TypeError(f"build_config must be a dict, got {build_config!r}")
    if "input_shape" not in build_config:
        raise ValueError(f"build_config: expected {{'input_shape': [...]}}, got {build_config!r}")
    shape = build_config["input_shape"]
    if shape is None:
        return None
    if not isinstance(shape, (list, tuple)) or not all(
        d is None or (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0)
        for d in shape
    ):
        raise ValueError(
            f"build_config: input_shape must be a list of sizes (int or None), got {shape!r}"
        )
    return tuple(None if d is None else int(d) for d in shape)


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_axis(axis: Any) -> int | list[int]:
    def is_int(a: Any) -> bool:
        return isinstance(a, numbers.Integral) and not isinstance(a, bool)

    if is_int(axis):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(is_int(a) for a in axis):
        return [int(a) for a in axis]
    raise TypeError(f"axis must be an int or a non-empty list/tuple of ints, got {axis!r}")


def _check_clipping(clipping: Any) -> dict[str, float] | None:
    if clipping is None:
        return None
    if not isinstance(clipping, Mapping):
        raise TypeError(f"renorm_clipping must be a dict or None, got {clipping!r}")
    unknown = set(clipping) - set(_CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"renorm_clipping: unknown keys {sorted(unknown)}; allowed: {list(_CLIPPING_KEYS)}"
        )
    result = {
        key: _check_number(value, f"renorm_clipping[{key!r}]")
        for key, value in clipping.items()
        if value is not None
    }
    if "rmax" in result and "rmin" in result and result["rmax"] < result["rmin"]:
        raise ValueError(
            f"renorm_clipping: rmax ({result['rmax']}) must be >= rmin ({result['rmin']})"
        )
    if result.get("dmax", 0.0) < 0:
        raise ValueError(f"renorm_clipping: dmax must be >= 0, got {result['dmax']}")
    return result


class BatchNormalization:
    """Keras' BatchNormalization layer, computed by the batchnorm kernels.

    Call it on an array (`layer(x, training=True)`), then `layer.backward(dy)` for dx and the
    parameter gradients in `layer.gradients`, and `layer.apply_gradients(lr)` for an SGD step.
    """

    # Keras' flag for layers that accept a `mask` argument (and pass the mask on unchanged).
    supports_masking = True

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        trainable: bool = True,
        virtual_batch_size: int | None = None,
        adjustment: Callable[[tuple[int, ...]], tuple[Any, Any]] | None = None,
        synchronized: bool = False,
        communicator: Any = None,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        self._axis_arg = _check_axis(axis)
        self.momentum = _check_number(momentum, "momentum")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.epsilon = _check_number(epsilon, "epsilon")
        if not self.epsilon > 0.0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        self.renorm_clipping = _check_clipping(renorm_clipping)
        self.renorm_momentum = _check_number(renorm_momentum, "renorm_momentum")
        if not 0.0 <= self.renorm_momentum <= 1.0:
            raise ValueError(f"renorm_momentum must be in [0, 1], got {renorm_momentum}")
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(
                virtual_batch_size, numbers.Integral
            ):
                raise TypeError(f"virtual_batch_size must be an int, got {virtual_batch_size!r}")
            if virtual_batch_size <= 0:
                raise ValueError(f"virtual_batch_size must be > 0, got {virtual_batch_size}")
            if adjustment is not None:
                raise ValueError("adjustment cannot be combined with virtual_batch_size")
            if 0 in (self._axis_arg if isinstance(self._axis_arg, list) else [self._axis_arg]):
                raise ValueError("axis 0 cannot be a feature axis when virtual_batch_size is set")
            virtual_batch_size = int(virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size
        if adjustment is not None and not callable(adjustment):
            raise TypeError("adjustment must be a callable taking the input shape")
        self.adjustment = adjustment
        if not isinstance(synchronized, bool):
            raise TypeError(f"synchronized must be a bool, got {synchronized!r}")
        self.synchronized = synchronized
        # The process group of synchronized statistics; not part of the config (a live handle).
        # An explicit one is checked now, the default (MPI.COMM_WORLD) at the first training call.
        if communicator is not None and not synchronized:
            raise ValueError("communicator is only used with synchronized=True")
        self.communicator = communicator
        self._sync_resolved = communicator is not None
        self._sync_hook = _mpi.hook_for(communicator) if communicator is not None else None
        self._policy: Policy = policy_from(dtype)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string, got {name!r}")
        index = next(_layer_ids)
        self.name = name or ("batch_normalization" + (f"_{index}" if index else ""))
        self._trainable = bool(trainable)

        self.built = False
        self._build_input_shape: tuple[int | None, ...] | None = None
        self._input_rank: int | None = None
        self._axes: list[int] = []
        self._feature_shape: tuple[int, ...] = ()
        self._param_shape: tuple[int, ...] = ()
        self._variables: dict[str, Variable] = {}
        self._last: dict[str, Any] | None = None
        self._options_cache: tuple[Any, Any] | None = None
        self._kernel_variables: list[Variable | None] = []
        # float32/float64 NumPy inputs of this dtype need no conversion (the fast path).
        self._numpy_compute_dtype = (
            np.dtype(self._policy.compute)
            if self._policy.compute in ("float32", "float64")
            else None
        )
        self._device = CPU
        self.gradients: dict[str, Any] = {}

    # ---- properties --------------------------------------------------------------------------
    @property
    def axis(self) -> int | list[int]:
        """The resolved feature axes after build (the constructor's value before)."""
        if not self.built:
            return self._axis_arg
        return self._axes[0] if len(self._axes) == 1 else list(self._axes)

    @property
    def dtype(self) -> str:
        """The variable dtype (Keras' `layer.dtype`)."""
        return self._policy.variable

    @property
    def compute_dtype(self) -> str:
        return self._policy.compute

    @property
    def dtype_policy(self) -> str:
        return self._policy.name

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        for key in ("gamma", "beta"):
            if key in self._variables:
                self._variables[key]._trainable = self._trainable

    @property
    def weights(self) -> list[Variable]:
        return list(self._variables.values())

    @property
    def trainable_weights(self) -> list[Variable]:
        return [v for v in self._variables.values() if v.trainable]

    @property
    def non_trainable_weights(self) -> list[Variable]:
        return [v for v in self._variables.values() if not v.trainable]

    @property
    def variables(self) -> list[Variable]:
        return self.weights

    @property
    def trainable_variables(self) -> list[Variable]:
        return self.trainable_weights

    @property
    def non_trainable_variables(self) -> list[Variable]:
        return self.non_trainable_weights

    def __getattr__(self, name: str) -> Variable | None:
        # gamma, beta, moving_mean, ... as attributes, like Keras' layer.moving_mean.
        variables = self.__dict__.get("_variables", {})
        if name in variables:
            return variables[name]
        if name in self._KERNEL_WEIGHT_ORDER:
            if not self.__dict__.get("built", False):
                raise AttributeError(
                    f"{self.__dict__.get('name', type(self).__name__)}: the layer is not built "
                    f"yet, so it has no weight {name!r}; call layer.build(input_shape) or call "
                    "the layer on an input first"
                )
            if name in ("gamma", "beta"):
                return None  # scale=False / center=False: Keras keeps layer.gamma / beta None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def losses(self) -> list[float]:
        """Regularization losses, one float per regularized trainable weight (Keras 3 values;
        a frozen layer reports none, as Keras 3 — tf.keras 2 still reported them)."""
        result: list[float] = []
        if not self._trainable:
            return result
        for key, regularizer in (
            ("gamma", self.gamma_regularizer),
            ("beta", self.beta_regularizer),
        ):
            if regularizer is not None and key in self._variables:
                result.append(float(regularizer(self._variables[key].numpy())))
        return result

    # ---- build -------------------------------------------------------------------------------
    def _resolve_axes(self, rank: int) -> list[int]:
        raw = self._axis_arg if isinstance(self._axis_arg, list) else [self._axis_arg]
        resolved = []
        for a in raw:
            r = a + rank if a < 0 else a
            if not 0 <= r < rank:
                raise ValueError(f"axis {a} is out of range for an input of rank {rank}")
            if r in resolved:
                raise ValueError(f"axis {raw} contains duplicates once resolved (axis {r})")
            resolved.append(r)
        if self.virtual_batch_size is not None and 0 in resolved:
            raise ValueError("axis 0 cannot be a feature axis when virtual_batch_size is set")
        return sorted(resolved)

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the weights for inputs of `input_shape` (the batch size may be None)."""
        if self.built:
            return
        shape = tuple(input_shape)
        rank = len(shape)
        if rank == 0:
            raise ValueError("BatchNormalization needs inputs of rank >= 1")
        if rank > 8:
            raise ValueError(f"inputs of rank {rank} exceed the supported maximum of 8")
        axes = self._resolve_axes(rank)
        feature_shape = []
        for a in axes:
            if shape[a] is None:
                raise ValueError(f"axis {a} of the input shape {shape} must be known to build")
            feature_shape.append(int(shape[a]))
        if len(axes) == 1:
            param_shape: tuple[int, ...] = (feature_shape[0],)
        else:
            param_shape = tuple(int(shape[i]) if i in axes else 1 for i in range(rank))
        variable_dtype = numpy_dtype(self._policy.variable)

        def make(initializer: Any) -> np.ndarray:
            value = np.asarray(initializer(param_shape, dtype=variable_dtype.name))
            return np.broadcast_to(value, param_shape).astype(variable_dtype)

        variables: dict[str, Variable] = {}
        if self.scale:
            variables["gamma"] = Variable("gamma", self, make(self.gamma_initializer), True)
        if self.center:
            variables["beta"] = Variable("beta", self, make(self.beta_initializer), True)
        moving_mean = make(self.moving_mean_initializer)
        moving_variance = make(self.moving_variance_initializer)
        variables["moving_mean"] = Variable("moving_mean", self, moving_mean, False)
        variables["moving_variance"] = Variable("moving_variance", self, moving_variance, False)
        if self.renorm:
            stddev = np.sqrt(moving_variance)
            variables["moving_stddev"] = Variable("moving_stddev", self, stddev, False)
            variables["renorm_mean"] = Variable("renorm_mean", self, moving_mean, False)
            variables["renorm_stddev"] = Variable("renorm_stddev", self, stddev, False)
        for key in ("gamma", "beta"):
            if key in variables:
                variables[key]._trainable = self._trainable
        for variable in variables.values():
            variable._move(self._device)
        self._input_rank = rank
        self._axes = axes
        self._feature_shape = tuple(feature_shape)
        self._param_shape = param_shape
        self._variables = variables
        self._kernel_variables = [variables.get(n) for n in self._KERNEL_WEIGHT_ORDER]
        self._build_input_shape = tuple(None if d is None else int(d) for d in shape)
        self.built = True

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    # ---- device ------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where the weights and moving statistics live: "cpu" or "cuda:N"."""
        return str(self._device)

    def to(self, device: Any) -> BatchNormalization:
        """Moves the weights and moving statistics to `device` ("cpu", "cuda" or "cuda:N") and
        returns the layer. Calls then need inputs on that device (nothing moves silently)."""
        target = parse_device(device)
        if target.type == "cuda" and not 0 <= target.index < _core.cuda_device_count():
            raise ValueError(
                f"{self.name}: no CUDA device {target.index} (batchnorm.cuda_available() is "
                f"{_core.cuda_available()}; this build or machine has "
                f"{_core.cuda_device_count()} CUDA devices)"
            )
        for variable in self._variables.values():
            variable._move(target)
        self._device = target
        self._last = None  # the last input lives on the old device
        return self

    def _check_device(self, device: Device, what: str) -> None:
        if device != self._device:
            raise ValueError(
                f"{self.name}: {what} is on {device} but the layer's weights are on "
                f"{self._device}; move the layer with layer.to({str(device)!r}) or the array "
                f"to {self._device}"
            )

    def _on_stream(self, framework: Any, arrays: list[Any]) -> None:
        """Orders the kernels after the caller's work: on the framework's current CUDA stream."""
        if self._device.type == "cuda":
            framework.before(arrays)
            _core.set_cuda_stream(framework.stream(self._device))

    # ---- weights -----------------------------------------------------------------------------
    def get_weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self._variables.values()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets all weights in Keras order; arrays may use any Keras layout of the same size.
        Validates everything before changing anything; constraints are not applied (as Keras)."""
        weights = list(weights)
        if not self.built:
            if not weights:
                return  # an unbuilt layer has no weights, so Keras accepts the empty list
            raise ValueError(f"{self.name}: build the layer (or call it) before set_weights")
        expected = list(self._variables.values())
        if len(weights) != len(expected):
            names = [v.name for v in expected]
            raise ValueError(
                f"{self.name}: set_weights expected {len(expected)} arrays {names}, got "
                f"{len(weights)}"
            )
        arrays = []
        for variable, value in zip(expected, weights):
            array = to_numpy(value)
            if array.size != variable._size:
                raise ValueError(
                    f"{self.name}: weight {variable.name!r} expects shape {variable.shape} "
                    f"({variable._size} values), got shape {array.shape}"
                )
            check_numeric(array, f"weight {variable.name!r}")
            arrays.append(array)
        for variable, array in zip(expected, arrays):
            variable.assign(array)

    # ---- calls -------------------------------------------------------------------------------
    _KERNEL_WEIGHT_ORDER = (
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    )

    def _weight_vectors(self) -> list[np.ndarray | None]:
        # Read each call: layer.to() replaces the storage of every variable.
        return [v._storage if v is not None else None for v in self._kernel_variables]

    def _options(self) -> Any:
        # Rebuilt only when a hyper-parameter changed: small tensors are dominated by overhead.
        # The axes are fixed once built; the clipping dict is compared by value, against a copy.
        key = (
            self.momentum,
            self.epsilon,
            self.renorm,
            self.renorm_momentum,
            self.renorm_clipping,
            self.virtual_batch_size,
        )
        if self._options_cache is not None and self._options_cache[0] == key:
            return self._options_cache[1]
        clipping = self.renorm_clipping
        key = key[:4] + (None if clipping is None else dict(clipping),) + key[5:]
        options = _core.Options()
        options.axes = list(self._axes)
        options.momentum = self.momentum
        options.epsilon = self.epsilon
        options.renorm = self.renorm
        options.renorm_momentum = self.renorm_momentum
        clipping = self.renorm_clipping or {}
        options.rmin = clipping.get("rmin", -math.inf)
        options.rmax = clipping.get("rmax", math.inf)
        options.dmax = clipping.get("dmax", math.inf)
        options.virtual_batch_size = self.virtual_batch_size or 0
        self._options_cache = (key, options)
        return options

    def _prepare_input(self, inputs: Any) -> Any:
        if (
            type(inputs) is np.ndarray
            and self._numpy_compute_dtype is not None
            # (`dtype == None` is True in NumPy: the None test above must come first)
            and inputs.dtype == self._numpy_compute_dtype
            and inputs.flags.aligned
            and self._device.type == "cpu"
            and inputs.ndim == self._input_rank
            and tuple([inputs.shape[a] for a in self._axes]) == self._feature_shape
        ):
            return inputs  # the common case, checked without the generic machinery
        array = read(inputs, "inputs")
        check_numeric(array, "inputs")
        shape = tuple(array.shape)
        if not shape:
            raise ValueError("inputs must have rank >= 1")
        if not self.built:
            self.build(shape)
        if len(shape) != self._input_rank:
            raise ValueError(
                f"{self.name}: expected inputs of rank {self._input_rank}, got shape {shape}"
            )
        actual = tuple(shape[a] for a in self._axes)
        if actual != self._feature_shape:
            raise ValueError(
                f"{self.name}: the feature axes {self._axes} have sizes {actual}, but the layer "
                f"was built for {self._feature_shape} (input shape {shape})"
            )
        framework = framework_of(array)
        self._check_device(framework.device(array), "the input")
        return framework.cast(array, data_dtype(self._policy, framework.dtype(array)))

    def _prepare_mask(self, mask: Any, x: Any, training: bool) -> Any:
        """The mask as a view of x's shape (stride 0 where it broadcasts), in the mask's own
        framework and on its device; None at inference, where the mask is not used.

        Two forms are accepted. Keras' own: rank `x.ndim - 1`, aligned with x's leading axes
        and broadcast along the last axis, whatever the feature axes are (on `(B, C, T)` with
        axis=1 a `(B, C)` mask selects whole (sample, channel) rows). And this package's
        general form: x's full rank, each dimension x's size or 1 (e.g. `(B, 1, H, W)` for
        per-pixel masks on NCHW). Like Keras, inference only checks the rank."""
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
        self._check_device(framework.device(array), "the mask")
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

    def _adjustment_vectors(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        assert self.adjustment is not None
        result = self.adjustment(shape)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ValueError("adjustment must return a pair (scale, bias)")
        dtype = numpy_dtype(self._policy.variable)
        vectors = []
        for label, value in zip(("scale", "bias"), result):
            array = np.asarray(to_numpy(value), dtype=np.float64)
            if array.size == math.prod(self._param_shape):
                array = array.reshape(self._param_shape)  # any Keras layout of the feature shape
            try:
                full = np.broadcast_to(array, self._param_shape)
            except ValueError:
                raise ValueError(
                    f"adjustment {label}: shape {array.shape} is not broadcastable to the feature "
                    f"shape {self._param_shape}"
                ) from None
            vectors.append(device_vector(np.array(full, dtype=dtype), self._device))
        return vectors[0], vectors[1]

    def _output_array(self, x: Any, out: Any, inputs: dict[str, Any]) -> Any:
        """The array the kernels write: a new one like x from x's own framework, or `out`
        checked against x and the call's `inputs` (name -> array or None), which it must not
        overlap. A NumPy `out` that is not aligned to its item size gets an aligned stand-in,
        copied into it by `_deliver`."""
        framework = framework_of(x)
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

    def _deliver(self, result: Any, out: Any) -> Any:
        """What a call returns: `out` when given (filled), else the new result array."""
        if out is None:
            return framework_of(result).finish(result, self._device)
        if result is not out:  # the aligned stand-in for a misaligned NumPy `out`
            out[...] = result
        return out

    def _communicator_hook(self) -> Any:
        """The core's reduction hook for this training call: None unless synchronized over more
        than one process."""
        if not self.synchronized:
            return None
        if not self._sync_resolved:
            self._sync_hook = _mpi.default_hook()
            self._sync_resolved = True
        return self._sync_hook

    def __call__(
        self, inputs: Any, training: bool | None = None, mask: Any = None, out: Any = None
    ) -> Any:
        """Normalizes `inputs` (NumPy, PyTorch, CuPy, JAX or any DLPack array, read in place on
        the layer's device); the result comes in the input's framework. `training` truthy uses
        (and updates) batch statistics unless the layer is frozen (`trainable=False`); `mask`
        selects the positions the statistics use; `out` receives the result in place."""
        if training is not None and training is not True and training is not False:
            # A truthy string such as "False" would otherwise silently train.
            if not isinstance(training, np.bool_):
                raise TypeError(
                    f"training must be True, False or None, got {training!r} "
                    f"({type(training).__name__})"
                )
        x = self._prepare_input(inputs)
        framework = framework_of(x)
        train = bool(training) and self._trainable
        mask_view = self._prepare_mask(mask, x, train)
        y = self._output_array(x, out, {"the input": x, "the mask": mask_view})
        x_view, bfloat16 = framework.kernel(x)
        y_view, _ = framework.kernel(y)
        options = self._options()
        if train:
            adjust = (None, None)
            if self.adjustment is not None:
                adjust = self._adjustment_vectors(tuple(x.shape))
            context = _core.TrainingContext()
            hook = self._communicator_hook()
            self._on_stream(framework, [x, mask_view])
            _core.train_forward(
                x_view,
                y_view,
                mask_view,
                options,
                self._weight_vectors(),
                adjust[0],
                adjust[1],
                True,
                context,
                bfloat16,
                hook,
            )
            self._last = {
                "training": True,
                "x": x,
                "mask": mask_view,
                "context": context,
                "communicator": hook,
            }
        else:
            self._on_stream(framework, [x])
            _core.infer_forward(x_view, y_view, options, self._weight_vectors(), bfloat16)
            self._last = {"training": False, "x": x}
        return self._deliver(y, out)

    def backward(self, dy: Any, out: Any = None) -> Any:
        """Gradient of the last call: returns dx in the input's framework and fills `gradients`
        ({"gamma", "beta"}, also in the input's framework and on the layer's device)."""
        if self._last is None:
            raise ValueError(f"{self.name}: backward needs a forward call first")
        x = self._last["x"]
        framework = framework_of(x)
        dy_array = read(dy, "dy")
        check_numeric(dy_array, "dy")
        if tuple(dy_array.shape) != tuple(x.shape):
            raise ValueError(
                f"dy: expected shape {tuple(x.shape)} (the last input's), got "
                f"{tuple(dy_array.shape)}"
            )
        dy_framework = framework_of(dy_array)
        self._check_device(dy_framework.device(dy_array), "dy")
        dy_array = dy_framework.cast(dy_array, framework.dtype(x))
        dx = self._output_array(
            x, out, {"the input": x, "dy": dy_array, "the mask": self._last.get("mask")}
        )
        features = math.prod(self._feature_shape)
        variable = self._policy.variable
        dgamma = framework.empty((features,), variable, self._device) if self.scale else None
        dbeta = framework.empty((features,), variable, self._device) if self.center else None
        dy_view, bfloat16 = dy_framework.kernel(dy_array)
        x_view, _ = framework.kernel(x)
        dx_view, _ = framework.kernel(dx)
        options = self._options()
        self._on_stream(framework, [x, dy_array])
        if self._last["training"]:
            _core.train_backward(
                dy_view,
                x_view,
                dx_view,
                self._last["mask"],
                options,
                self._weight_vectors(),
                self._last["context"],
                dgamma,
                dbeta,
                bfloat16,
                self._last["communicator"],
            )
        else:
            _core.infer_backward(
                dy_view, x_view, dx_view, options, self._weight_vectors(), dgamma, dbeta, bfloat16
            )
        gradients = {}
        if dgamma is not None:
            gradients["gamma"] = framework.finish(dgamma, self._device).reshape(self._param_shape)
        if dbeta is not None:
            gradients["beta"] = framework.finish(dbeta, self._device).reshape(self._param_shape)
        self.gradients = gradients
        return self._deliver(dx, out)

    def apply_gradients(self, learning_rate: float) -> None:
        """One plain SGD step on gamma/beta with the stored gradients plus the regularizers'
        gradients, then the constraints, as a Keras optimizer applies them."""
        lr = _check_number(learning_rate, "learning_rate")
        if not self.gradients:
            if not (self.scale or self.center):
                return  # no gamma or beta: nothing to update, with or without a backward call
            raise ValueError(f"{self.name}: apply_gradients needs a backward call first")
        if not self._trainable:
            return
        updates = {}
        for key, regularizer, constraint in (
            ("gamma", self.gamma_regularizer, self.gamma_constraint),
            ("beta", self.beta_regularizer, self.beta_constraint),
        ):
            if key not in self._variables:
                continue
            value = self._variables[key].numpy()
            step = to_numpy(self.gradients[key]).astype(np.float64)
            if regularizer is not None:
                step = step + regularizers.gradient(regularizer, value)
            new_value = (value - lr * step).astype(value.dtype)
            if constraint is not None:
                new_value = np.asarray(constraint(new_value), dtype=value.dtype)
            updates[key] = new_value
        for key, value in updates.items():
            self._variables[key].assign(value)

    # ---- config ------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        if self.adjustment is not None:
            warnings.warn(
                "adjustment is a Python callable and is not serialized by get_config",
                stacklevel=2,
            )
        return {
            "name": self.name,
            "trainable": self._trainable,
            "dtype": {
                "module": "keras",
                "class_name": "DTypePolicy",
                "config": {"name": self._policy.name},
                "registered_name": None,
            },
            "axis": self._axis_arg,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "renorm": self.renorm,
            "renorm_clipping": dict(self.renorm_clipping) if self.renorm_clipping else None,
            "renorm_momentum": self.renorm_momentum,
            "synchronized": self.synchronized,
            "virtual_batch_size": self.virtual_batch_size,
            "fused": self.fused,
        }

    # Keys Keras writes that carry no behaviour here.
    _IGNORED_CONFIG_KEYS = frozenset({"batch_input_shape", "build_config", "input_shape"})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BatchNormalization:
        """Rebuilds a layer from `get_config()` or from a tf.keras 2 / Keras 3 config, built when
        the config carries a `build_config` (`{"input_shape": [...]}`). A whole serialized entry
        (`{"class_name": ..., "config": ...}`, as in a model's config) goes to `deserialize`."""
        if not isinstance(config, Mapping):
            raise TypeError(f"from_config expects a dict, got {type(config).__name__}")
        if "class_name" in config and "config" in config:
            from .serialization import deserialize  # serialization imports this module

            return deserialize(config)
        kwargs = {k: v for k, v in config.items() if k not in cls._IGNORED_CONFIG_KEYS}
        unknown = sorted(set(kwargs) - set(inspect.signature(cls).parameters))
        if unknown:
            raise TypeError(
                f"from_config: unknown config keys {unknown} for BatchNormalization (a serialized "
                "layer entry with 'class_name' and 'config' goes to batchnorm.deserialize)"
            )
        if kwargs.get("renorm_clipping") == {}:
            kwargs["renorm_clipping"] = None
        input_shape = build_input_shape(config.get("build_config"))
        layer = cls(**kwargs)
        if input_shape is not None:
            layer.build(input_shape)
        return layer

    def __repr__(self) -> str:
        return (
            f"BatchNormalization(name={self.name!r}, axis={self.axis!r}, momentum={self.momentum},"
            f" epsilon={self.epsilon}, dtype={self._policy.name!r}, built={self.built})"
        )
