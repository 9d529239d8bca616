"""`BatchNormalization`: the Keras layer (training, inference, moving statistics, masks, batch
renormalization, ghost batches, adjustment, regularizers, constraints and the backward pass) on
top of the compiled kernels in `batchnorm._core`."""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import operator
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, overload

import numpy as np

from . import _core, _mpi, constraints, functional, initializers, regularizers
from ._arrays import (
    _NUMPY,
    CPU,
    Device,
    assign_vector,
    check_numeric,
    device_vector,
    framework_of,
    parse_device,
    read,
    to_numpy,
    vector_to_host,
)
from ._dtypes import Policy, data_dtype, numpy_dtype, policy_from
from .functional import _number


class SupportsDLPack(Protocol):
    """An array of any framework that exports DLPack: NumPy, PyTorch, JAX, CuPy, ..."""

    def __dlpack_device__(self) -> Any: ...


# A call returns an array of its input's own type (a NumPy array for a NumPy input or for a
# list, a torch.Tensor for a tensor, ...).
ArrayT = TypeVar("ArrayT", bound=SupportsDLPack)

_layer_ids = itertools.count()


# What a plain NumPy call keeps for its backward, until one asks for it: (x, options, (weights,
# statistics or None), communicator). A tuple, not a functional.Context: making one costs a
# quarter of a microsecond per call, which most calls (inference, or a training call followed by
# another) never use.
_PlainCall = tuple[np.ndarray, functional.Options, tuple[Any, Any], Any]


def _context_of(call: functional.Context | _PlainCall) -> functional.Context:
    if type(call) is not tuple:
        return call
    x, options, (weights, statistics), communicator = call
    return functional.Context(
        statistics is not None, x, None, options, weights, statistics, communicator
    )


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
        """False freezes the layer: training calls run in inference mode and update nothing."""
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
        """A host copy of the value in the Keras weight shape (never one mixing two training
        steps of another thread)."""
        layer = self._layer()
        if layer is None:
            return self._host()
        return layer._snapshot(self._host)

    def _host(self) -> np.ndarray:
        return vector_to_host(self._storage).reshape(self._shape)

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
        layer = self._layer()
        if layer is None:
            assign_vector(self._storage, array.reshape(-1))
            return
        layer._access.begin_write(False, layer.name)
        try:
            assign_vector(self._storage, array.reshape(-1))
        finally:
            layer._access.end_write()

    def _move(self, device: Device) -> None:
        if device != self._device:
            self._storage = device_vector(self._host(), device)
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


class _Weight:
    """Keras' `layer.moving_mean`, `layer.gamma`, ...: the layer's Variable of that name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def _variable(self, layer: BatchNormalization) -> Variable | None:
        variable = layer._variables.get(self.name)
        if variable is None and not layer.built:
            raise AttributeError(
                f"{layer.name}: the layer is not built yet, so it has no weight {self.name!r}; "
                "call layer.build(input_shape) or call the layer on an input first"
            )
        return variable


class _Parameter(_Weight):
    """gamma or beta: None where scale=False / center=False, as Keras keeps them."""

    def __get__(self, layer: BatchNormalization | None, owner: type) -> Variable | None:
        return None if layer is None else self._variable(layer)


class _Statistic(_Weight):
    """A moving or renorm statistic (the renorm ones exist with renorm=True only)."""

    def __get__(self, layer: BatchNormalization | None, owner: type) -> Variable:
        variable = None if layer is None else self._variable(layer)
        if variable is None:
            raise AttributeError(f"this layer has no {self.name} (it exists with renorm=True)")
        return variable


class BatchNormalization:
    """Keras' BatchNormalization layer, computed by the batchnorm kernels.

    Call it on an array (`layer(x, training=True)`), then `layer.backward(dy)` for dx and the
    parameter gradients in `layer.gradients`, and `layer.apply_gradients(lr)` for an SGD step.

    Arguments (Keras' names and defaults):

    - axis: the feature axis, or a list of them (-1: the last, channels-last data).
    - momentum: the decay of the moving statistics (moving = moving * momentum + batch * (1 -
      momentum)); epsilon: added to the variance.
    - center, scale: whether the layer has beta / gamma.
    - beta_initializer, gamma_initializer, moving_mean_initializer,
      moving_variance_initializer: Keras initializers (a name, a config dict or an object).
    - beta_regularizer, gamma_regularizer: Keras regularizers, in `losses` and in
      `apply_gradients`; beta_constraint, gamma_constraint: applied after each update.
    - renorm, renorm_clipping ({"rmax", "rmin", "dmax"}), renorm_momentum: batch
      renormalization.
    - fused: accepted for Keras compatibility (the kernels are always fused).
    - trainable: False freezes the layer (inference, no updates), as in Keras.
    - virtual_batch_size: ghost batches of this many samples.
    - adjustment: Keras' callable(input_shape) -> (scale, bias) applied in training.
    - synchronized, communicator: statistics over every process of an MPI communicator
      (MPI.COMM_WORLD by default).
    - name, dtype: the layer's name and Keras dtype policy ("float32", "mixed_float16", ...).
    """

    gamma = _Parameter()
    beta = _Parameter()
    moving_mean = _Statistic()
    moving_variance = _Statistic()
    moving_stddev = _Statistic()
    renorm_mean = _Statistic()
    renorm_stddev = _Statistic()

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
        """A layer with Keras' arguments (see the class docstring); it builds its weights at the
        first call, or at `build(input_shape)`. Bad arguments raise TypeError/ValueError here."""
        # Types and ranges are checked once, here (ranges by the core); the value is frozen.
        self._options = functional.Options(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            renorm=renorm,
            renorm_momentum=renorm_momentum,
            renorm_clipping=renorm_clipping,
            virtual_batch_size=virtual_batch_size,
        )
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        if adjustment is not None:  # the core's rule, checked now rather than at the call
            _core.validate(self._options.core, with_adjustment=True)
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
        # The feature sizes of an input shape, as _feature_key holds them for the built layer
        # (an int for one feature axis): one C-level call on the per-call fast path.
        self._feature_sizes: Callable[[tuple[int, ...]], Any] | None = None
        self._feature_key: Any = None
        self._param_shape: tuple[int, ...] = ()
        self._variables: dict[str, Variable] = {}
        # The variables' storage bound for the kernels; bound again when the storage changes.
        self._bound: functional.Weights | None = None
        # The last call's context (what backward differentiates), and weak references to the
        # outputs of training calls not differentiated yet: two of them alive at a backward
        # mean the layer was used twice in one computation (see _last_call).
        # A plain call keeps its context as a _PlainCall record, made a Context when needed.
        self._last: functional.Context | _PlainCall | None = None
        self._undifferentiated: list[tuple[weakref.ref, functional.Context | _PlainCall]] = []
        self._warned_detached = False
        # float32/float64 NumPy inputs of this dtype need no conversion (the fast path).
        self._numpy_compute_dtype = (
            np.dtype(self._policy.compute)
            if self._policy.compute in ("float32", "float64")
            else None
        )
        self._device = CPU
        self.gradients: dict[str, Any] = {}
        # Who changes the weights now, across threads: writers (training calls, weight
        # changes) hold it; readers read again where a writer overlapped them.
        self._access = _core.WeightAccess()

    # ---- properties --------------------------------------------------------------------------
    @property
    def axis(self) -> int | list[int]:
        """The resolved feature axes after build (the constructor's value before)."""
        if not self.built:
            return self._options.axis
        return self._axes[0] if len(self._axes) == 1 else list(self._axes)

    # Hyper-parameters: read from the frozen options; the ones Keras code tunes after
    # construction can be set, each change validated as a new Options value.
    @property
    def options(self) -> functional.Options:
        """The layer's hyper-parameters as `batchnorm.functional.Options`."""
        return self._options

    @property
    def momentum(self) -> float:
        """The decay of the moving statistics (settable; validated)."""
        return self._options.momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self._options = self._options.replace(momentum=value)

    @property
    def epsilon(self) -> float:
        """The small value added to the variance (settable; validated)."""
        return self._options.epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._options = self._options.replace(epsilon=value)

    @property
    def renorm_momentum(self) -> float:
        """The decay of renorm's statistics (settable; validated)."""
        return self._options.renorm_momentum

    @renorm_momentum.setter
    def renorm_momentum(self, value: float) -> None:
        self._options = self._options.replace(renorm_momentum=value)

    @property
    def renorm_clipping(self) -> dict[str, float] | None:
        """Renorm's {"rmax", "rmin", "dmax"} bounds, or None (settable; validated)."""
        clipping = self._options.renorm_clipping
        return None if clipping is None else dict(clipping)

    @renorm_clipping.setter
    def renorm_clipping(self, value: Mapping[str, float] | None) -> None:
        self._options = self._options.replace(renorm_clipping=value)

    # These decide which weights exist and how they are shaped: fixed at construction.
    @property
    def center(self) -> bool:
        """Whether the layer has beta (Keras' `center`; fixed at construction)."""
        return self._options.center

    @property
    def scale(self) -> bool:
        """Whether the layer has gamma (Keras' `scale`; fixed at construction)."""
        return self._options.scale

    @property
    def renorm(self) -> bool:
        """Whether batch renormalization is on (fixed at construction)."""
        return self._options.renorm

    @property
    def virtual_batch_size(self) -> int | None:
        """The ghost-batch size, or None."""
        return self._options.virtual_batch_size

    @property
    def dtype(self) -> str:
        """The variable dtype (Keras' `layer.dtype`)."""
        return self._policy.variable

    @property
    def compute_dtype(self) -> str:
        """The dtype the layer computes and returns (its dtype policy's compute dtype)."""
        return self._policy.compute

    @property
    def dtype_policy(self) -> str:
        """The Keras dtype policy's name ("float32", "mixed_float16", ...)."""
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
        """Every weight, Keras order."""
        return list(self._variables.values())

    @property
    def trainable_weights(self) -> list[Variable]:
        """gamma and beta where they exist, unless the layer is frozen."""
        return [v for v in self._variables.values() if v.trainable]

    @property
    def non_trainable_weights(self) -> list[Variable]:
        """The moving (and renorm) statistics, plus gamma/beta when frozen."""
        return [v for v in self._variables.values() if not v.trainable]

    @property
    def variables(self) -> list[Variable]:
        """Every weight, Keras order (Keras 3's name for `weights`)."""
        return self.weights

    @property
    def trainable_variables(self) -> list[Variable]:
        """Keras 3's name for `trainable_weights`."""
        return self.trainable_weights

    @property
    def non_trainable_variables(self) -> list[Variable]:
        """Keras 3's name for `non_trainable_weights`."""
        return self.non_trainable_weights

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
    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the weights for inputs of `input_shape` (the batch size may be None)."""
        if self.built:
            return
        # Threads calling a new layer at once build it once.
        self._access.begin_write(False, self.name)
        try:
            if not self.built:
                self._build(input_shape)
        finally:
            self._access.end_write()

    def _build(self, input_shape: Sequence[int | None]) -> None:
        shape = tuple(input_shape)
        schema = self._options.schema(shape)  # resolves and checks the axes (the core's rules)
        param_shape = tuple(schema.weight_shape)
        variable_dtype = numpy_dtype(self._policy.variable)

        def make(initializer: Any) -> np.ndarray:
            value = np.asarray(initializer(param_shape, dtype=variable_dtype.name))
            return np.broadcast_to(value, param_shape).astype(variable_dtype)

        initial = {
            "gamma": lambda: make(self.gamma_initializer),
            "beta": lambda: make(self.beta_initializer),
            "moving_mean": lambda: make(self.moving_mean_initializer),
            "moving_variance": lambda: make(self.moving_variance_initializer),
        }
        values: dict[str, np.ndarray] = {}
        for name in schema.names:  # Keras' order, from the core
            if name in initial:
                values[name] = initial[name]()
            elif name == "renorm_mean":
                values[name] = values["moving_mean"]
            else:  # moving_stddev, renorm_stddev
                values[name] = np.sqrt(values["moving_variance"])
        variables = {
            name: Variable(name, self, value, name in ("gamma", "beta") and self._trainable)
            for name, value in values.items()
        }
        for variable in variables.values():
            variable._move(self._device)
        self._input_rank = len(shape)
        self._axes = list(schema.axes)
        self._feature_shape = tuple(schema.feature_shape)
        self._feature_sizes = operator.itemgetter(*self._axes)
        self._feature_key = self._feature_sizes(tuple(shape))
        self._param_shape = param_shape
        self._variables = variables
        self._bound = None
        self._build_input_shape = tuple(None if d is None else int(d) for d in shape)
        self.built = True

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        """The output's shape for inputs of `input_shape`: the same (normalization keeps it)."""
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
        self._access.begin_write(False, self.name)
        try:
            for variable in self._variables.values():
                variable._move(target)
            self._device = target
            self._bound = None
        finally:
            self._access.end_write()
        self._last = None  # the last input lives on the old device
        self._undifferentiated.clear()
        return self

    # ---- weights -----------------------------------------------------------------------------
    def get_weights(self) -> list[np.ndarray]:
        """Host NumPy copies of every weight, in Keras' order and shapes (all of one training
        step, whatever other threads do)."""
        return self._snapshot(lambda: [v._host() for v in self._variables.values()])

    def _snapshot(self, read: Callable[[], Any]) -> Any:
        """`read()` of the weights, read again holding the guard's lock where a writer was at work
        or began meanwhile (retried without the lock, a long read beside a training loop could
        fail every time)."""
        access = self._access
        version = access.version
        if not version & 1:
            value = read()
            if access.version == version:
                return value
        access.begin_read()
        try:
            return read()
        finally:
            access.end_read()

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
        self._access.begin_write(False, self.name)  # all weights change together
        try:
            for variable, array in zip(expected, arrays):
                assign_vector(variable._storage, np.asarray(array, variable.dtype).reshape(-1))
        finally:
            self._access.end_write()

    # ---- calls -------------------------------------------------------------------------------
    def _bound_weights(self) -> functional.Weights:
        # Bound at the first call after build() or to(), which replace the variables' storage.
        if self._bound is None:
            self._bound = functional.Weights(
                **{name: variable._storage for name, variable in self._variables.items()}
            )
        return self._bound

    def _prepare_input(self, inputs: Any) -> Any:
        if (
            type(inputs) is np.ndarray
            and self._numpy_compute_dtype is not None
            # (`dtype == None` is True in NumPy: the None test above must come first)
            and inputs.dtype == self._numpy_compute_dtype
            and inputs.flags.aligned
            and self._device.type == "cpu"
            and inputs.ndim == self._input_rank
            and self._feature_sizes(inputs.shape) == self._feature_key
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
        self._warn_if_detached(array)
        return framework.cast(array, data_dtype(self._policy, framework.dtype(array)))

    def _warn_if_detached(self, array: Any) -> None:
        """A PyTorch tensor that requires grad comes back without autograd history: say so once
        instead of letting loss.backward() silently leave the earlier gradients None."""
        if self._warned_detached or not getattr(array, "requires_grad", False):
            return
        self._warned_detached = True
        warnings.warn(
            f"{self.name}: the input requires grad, but batchnorm.BatchNormalization does not "
            "record PyTorch autograd history: its output is detached, so loss.backward() will "
            "not reach the layers before it. Differentiate the layer yourself with "
            "layer.backward(dy) (dx and layer.gradients).",
            UserWarning,
            stacklevel=3,
        )

    def _adjustment_vectors(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
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
            # Host values: the call copies them in its stream order (functional.forward).
            vectors.append(np.array(full, dtype=dtype).reshape(-1))
        return vectors[0], vectors[1]

    def _communicator_hook(self) -> Any:
        """The core's reduction hook for this training call: None unless synchronized over more
        than one process."""
        if not self.synchronized:
            return None
        if not self._sync_resolved:
            self._sync_hook = _mpi.default_hook()
            self._sync_resolved = True
        return self._sync_hook

    @overload
    def __call__(
        self,
        inputs: ArrayT,
        training: bool | None = None,
        mask: Any = None,
        out: ArrayT | None = None,
    ) -> ArrayT: ...

    @overload
    def __call__(
        self,
        inputs: float | Sequence[Any],
        training: bool | None = None,
        mask: Any = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def __call__(
        self, inputs: Any, training: bool | None = None, mask: Any = None, out: Any = None
    ) -> Any:
        """Normalizes `inputs` (NumPy, PyTorch, CuPy, JAX or any DLPack array, read in place on
        the layer's device); the result comes in the input's framework. `training=True` uses
        (and updates) batch statistics unless the layer is frozen (`trainable=False`); `mask`
        selects the positions the statistics use; `out` receives the result in place."""
        if training is not None and training is not True and training is not False:
            # A truthy string such as "False" would otherwise silently train.
            if not isinstance(training, np.bool_):
                raise TypeError(
                    f"training must be True, False or None, got {training!r} "
                    f"({type(training).__name__})"
                )
        train = bool(training) and self._trainable
        access = self._access
        if (
            type(inputs) is np.ndarray
            and mask is None
            and (out is None or type(out) is np.ndarray)
            and self._numpy_compute_dtype is not None
            # (`dtype == None` is True in NumPy: the None test above must come first)
            and inputs.dtype == self._numpy_compute_dtype
            and inputs.ndim == self._input_rank
            and self._feature_sizes(inputs.shape) == self._feature_key
            and (self.adjustment is None or not train)
        ):
            # The common call: a NumPy array of the layer's dtype, rank and feature sizes goes to
            # the kernels in one C++ call, without the general path's per-call conversions
            # (None, with nothing done, where the extension finds the array misaligned, an
            # `out=` it cannot write as it is, or the weights on CUDA: the general path below
            # then takes the call, with its conversions and errors).
            weights = self._bound or self._bound_weights()
            options = self._options
            y = _NUMPY.empty_like(inputs) if out is None else out
            communicator = self._communicator_hook() if train and self.synchronized else None
            # The extension holds the thread guard itself: as the writer for a training call,
            # reading the weights again for an inference call that a writer overlapped.
            kept = _core.plain_forward(
                inputs, y, train, True, options.core, weights, communicator, access, self.name
            )
            if kept is not None:
                record = (inputs, options, kept, communicator)  # a _PlainCall
                self._last = record
                if train:
                    self._track_training_output(y, record)
                return y
        x = self._prepare_input(inputs)
        weights = self._bound or self._bound_weights()
        if train:
            # The arguments, the user's adjustment among them, are evaluated before the thread
            # guard (WeightAccess) is taken: a training call holds it as the writer.
            adjustment = (
                None if self.adjustment is None else self._adjustment_vectors(tuple(x.shape))
            )
            communicator = self._communicator_hook() if self.synchronized else None
            access.begin_write(True, self.name)
            try:
                y, context = functional.forward(
                    x,
                    weights,
                    self._options,
                    training=True,
                    mask=mask,
                    adjustment=adjustment,
                    out=out,
                    communicator=communicator,
                )
            finally:
                access.end_write()
            self._last = context
            self._track_training_output(y, context)
            return y
        # An inference call reads the weights as a reader: computed again if a training step of
        # another thread overlapped it.
        y, context = self._snapshot(
            lambda: functional.forward(
                x, weights, self._options, training=False, mask=mask, out=out
            )
        )
        self._last = context
        return y

    def _track_training_output(self, y: Any, call: functional.Context | _PlainCall) -> None:
        pending = self._undifferentiated
        if pending:
            # Outputs freed meanwhile, or y itself (an `out=` written again), no longer count.
            if len(pending) == 1:  # (the common case, without a list comprehension's frame)
                earlier = pending[0][0]()
                if earlier is None or earlier is y:
                    pending = []
            else:
                pending = [
                    (r, c) for r, c in pending if (output := r()) is not None and output is not y
                ]
        try:
            entry = (weakref.ref(y), call)
        except TypeError:  # an array type without weak references: nothing to compare with
            self._undifferentiated = []
            return
        self._undifferentiated = [*pending, entry] if pending else [entry]

    def _last_call(self) -> functional.Context | _PlainCall:
        """The last call, whose output backward differentiates. Backward differentiates the
        last call only: if outputs of two or more training calls are still alive and none of
        them was differentiated, the layer was used more than once in one computation, and dy
        may belong to an earlier call whose statistics are gone — refuse rather than return a
        wrong gradient."""
        if self._last is None:
            raise ValueError(f"{self.name}: backward needs a forward call first")
        if len(self._undifferentiated) < 2:  # (the common case: nothing to prune or refuse)
            return self._last
        alive = [(ref, c) for ref, c in self._undifferentiated if ref() is not None]
        self._undifferentiated = alive
        if len(alive) > 1:
            raise ValueError(
                f"{self.name}: {len(alive)} outputs of training calls are alive and not yet "
                "differentiated, but backward(dy) can only differentiate the last call (dy of "
                "an earlier call would get the last call's statistics). Call backward after "
                "each forward call, drop the outputs you will not differentiate, or keep each "
                "call's context with batchnorm.functional.forward / backward."
            )
        return self._last

    def backward(self, dy: ArrayT, out: ArrayT | None = None) -> ArrayT:
        """Gradient of the last call: returns dx in the input's framework and fills `gradients`
        ({"gamma", "beta"}, also in the input's framework and on the layer's device). The call's
        own statistics and weights are used, so a second backward (even after an update of
        gamma) gives the same result."""
        call = self._last_call()
        context = _context_of(call)
        dx, dgamma, dbeta = functional.backward(dy, context, out=out)
        if self._last is call:  # (not if another thread's call finished meanwhile)
            self._last = context  # made once: a second backward of this call reuses it
        pending = self._undifferentiated
        if pending:  # this call's output is differentiated now
            if len(pending) == 1:
                if pending[0][1] is call or pending[0][1] is context:
                    self._undifferentiated = []
            else:
                self._undifferentiated = [
                    (ref, c) for ref, c in pending if c is not call and c is not context
                ]
        gradients = {}
        shape = self._param_shape
        flat = len(shape) == 1  # the vectors already have Keras' shape
        if dgamma is not None:
            gradients["gamma"] = dgamma if flat else dgamma.reshape(shape)
        if dbeta is not None:
            gradients["beta"] = dbeta if flat else dbeta.reshape(shape)
        self.gradients = gradients
        return dx

    def apply_gradients(self, learning_rate: float) -> None:
        """One plain SGD step on gamma/beta with the stored gradients plus the regularizers'
        gradients, then the constraints, as a Keras optimizer applies them."""
        lr = _number(learning_rate, "learning_rate")
        if not self.gradients:
            if not (self.scale or self.center):
                return  # no gamma or beta: nothing to update, with or without a backward call
            raise ValueError(f"{self.name}: apply_gradients needs a backward call first")
        if not self._trainable:
            return
        self._access.begin_write(False, self.name)
        try:
            self._apply_gradients(lr)
        finally:
            self._access.end_write()

    def _apply_gradients(self, lr: float) -> None:
        updates = {}
        for key, regularizer, constraint in (
            ("gamma", self.gamma_regularizer, self.gamma_constraint),
            ("beta", self.beta_regularizer, self.beta_constraint),
        ):
            if key not in self._variables:
                continue
            value = self._variables[key]._host()
            step = to_numpy(self.gradients[key]).astype(np.float64)
            if regularizer is not None:
                step = step + regularizers.gradient(regularizer, value)
            new_value = (value - lr * step).astype(value.dtype)
            if constraint is not None:
                new_value = np.asarray(constraint(new_value), dtype=value.dtype)
            updates[key] = new_value
        for key, value in updates.items():
            assign_vector(self._variables[key]._storage, value.reshape(-1))

    # ---- config ------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Keras 3's layer config: every argument (initializers, regularizers and constraints
        serialized), the dtype policy and the build shape; `from_config` reads it back, as do
        Keras and `batchnorm.torch.BatchNormalization.from_keras`."""
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
            "axis": self._options.axis,
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


def copy_for_module(
    config: Mapping[str, Any] | BatchNormalization, weights: Sequence[Any] | None
) -> tuple[BatchNormalization, Sequence[Any] | None]:
    """What the framework modules' `from_keras` start from: a new, unbuilt layer from a Keras
    layer config or from a batchnorm layer's config, and the weights to load (a built batchnorm
    layer's own where `weights` is None)."""
    if isinstance(config, BatchNormalization):
        if weights is None and config.built:
            weights = config.get_weights()
        return BatchNormalization.from_config(config.get_config()), weights
    if isinstance(config, Mapping):
        return BatchNormalization.from_config(config), weights
    raise TypeError(
        f"from_keras takes a Keras layer config or a batchnorm.BatchNormalization, got "
        f"{type(config).__name__}"
    )
