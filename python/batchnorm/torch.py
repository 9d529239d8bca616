"""Keras-exact batch normalization for PyTorch: a differentiable function, an `nn.Module`, and the
`torch.library` custom ops behind them (so `torch.compile(fullgraph=True)` traces through).

    >>> import torch
    >>> import batchnorm.torch as bnt
    >>> bn = bnt.BatchNormalization(axis=1)          # Keras' defaults: momentum 0.99, epsilon 1e-3
    >>> x = torch.randn(8, 3, 4, 4, requires_grad=True)
    >>> bn(x).square().mean().backward()              # gradients to x, bn.gamma and bn.beta
    >>> sorted(bn.state_dict())                       # Keras' weight names
    ['beta', 'gamma', 'moving_mean', 'moving_variance']

Two routes reach the same kernels. Eager calls go through an `autograd.Function` that updates the
moving statistics in place (the cheapest call). Under `torch.compile` the calls become the custom
ops `batchnorm::train_forward`, `batchnorm::infer_forward` and their backward ops: functional ops
(the new moving statistics are outputs, written back by the caller) with fake implementations
and registered autograd, which is what the compiler needs. Both give the same numbers.

The weights are flat vectors of C = the product of the feature sizes (float32; float64 for
float64 data), stored under Keras' names; `get_weights`/`set_weights` use Keras' shapes and order.
"""

from __future__ import annotations

import atexit
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _core, regularizers
from . import functional as F
from .layer import BatchNormalization as _KerasLayer
from .layer import copy_for_module

__all__ = ["BatchNormalization", "batch_norm"]

_HALF = (torch.float16, torch.bfloat16)
_MOVING = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")

# ---- options and process groups travel to the custom ops as strings ---------------------------
# (custom ops take tensors and plain scalars only)


def _options_of(key: str) -> F.Options:
    return F.Options.from_json(key[: key.index("\n")])


# Process groups of synchronized calls by key; "" is no synchronization, "default" the default
# group of torch.distributed.
_GROUPS: dict[str, Any] = {}


def _group_key(synchronized: bool, process_group: Any) -> str:
    if not synchronized:
        return ""
    if process_group is None:
        return "default"
    key = f"group-{id(process_group)}"
    _GROUPS[key] = process_group
    return key


@functools.lru_cache(maxsize=64)
def _hook_for(key: str, size: int, backend: str) -> Any:
    group = _GROUPS.get(key)  # None: the default group
    if backend == "nccl":  # NCCL gathers device memory: stage the few values through it
        device = torch.device("cuda", torch.cuda.current_device())

        def allgather(send: np.ndarray, receive: np.ndarray) -> None:
            gathered = torch.empty(receive.size, dtype=torch.float64, device=device)
            dist.all_gather_into_tensor(gathered, torch.from_numpy(send).to(device), group=group)
            receive[...] = gathered.cpu().numpy()

    else:

        def allgather(send: np.ndarray, receive: np.ndarray) -> None:
            outputs = list(torch.from_numpy(receive).chunk(size))
            dist.all_gather(outputs, torch.from_numpy(send), group=group)

    return _core.Communicator(size, allgather)


@atexit.register
def _release_communicators() -> None:
    # The cached hooks hold Python callables into torch.distributed: drop them while the
    # interpreter and the process groups are still whole, not during teardown.
    _hook_for.cache_clear()
    _GROUPS.clear()


def _communicator(key: str) -> Any:
    """The core's reduction hook for a group key: None without synchronization, without an
    initialized process group, or in a group of one (the single-process result)."""
    if not key or not dist.is_available() or not dist.is_initialized():
        return None
    group = _GROUPS.get(key)
    size = dist.get_world_size(group)
    if size == 1:
        return None
    return _hook_for(key, size, str(dist.get_backend(group)))


# ---- the computation both routes share ---------------------------------------------------------


def _weights(
    gamma: Tensor | None, beta: Tensor | None, moving: Sequence[Tensor | None]
) -> dict[str, Any]:
    return {"gamma": gamma, "beta": beta, **dict(zip(_MOVING, moving))}


def _feature_count(x: Tensor, options: F.Options) -> int:
    return options.schema(list(x.shape)).features


def _adjustment(scale: Tensor | None, bias: Tensor | None) -> tuple[Any, Any] | None:
    return None if scale is None and bias is None else (scale, bias)


def _training_context(
    x: Tensor, mask: Tensor | None, gamma: Tensor | None, has_beta: bool, saved: Tensor, key: str
) -> F.Context:
    """A training forward's context rebuilt from its outputs, for the backward op."""
    dtype = gamma.dtype if gamma is not None else _weight_dtype(x)
    beta = torch.empty(_feature_count(x, _options_of(key)), dtype=dtype, device=x.device)
    weights = {"gamma": _plain(gamma), "beta": beta if has_beta else None}
    group = key[key.index("\n") + 1 :]
    return F.training_context(
        x, mask, weights, _options_of(key), saved.detach(), _communicator(group)
    )


def _weight_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _plain(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _parameter_gradients(dx_dgamma_dbeta: tuple[Any, Any, Any], context: F.Context) -> Any:
    """A synchronized backward's dgamma/dbeta are sums over every rank; each rank reports its
    share (the sum over the group size), as nn.SyncBatchNorm does, so that DDP's averaging of
    parameter gradients gives those of the mean loss, as for every other parameter."""
    dx, dgamma, dbeta = dx_dgamma_dbeta
    communicator = context.communicator
    if communicator is None:
        return dx, dgamma, dbeta
    share = 1.0 / communicator.size
    return (
        dx,
        None if dgamma is None else dgamma.mul_(share),
        None if dbeta is None else dbeta.mul_(share),
    )


def _or_empty(gradient: Tensor | None, x: Tensor, dtype: torch.dtype) -> Tensor:
    # An op returns tensors only: an absent weight's gradient is an empty one (of its own).
    return x.new_empty(0, dtype=dtype) if gradient is None else gradient


def _pack(context: F.Context) -> Tensor:
    # On CUDA the forward kept its statistics in a tensor of the packed layout: handed on as
    # it is, so that the step neither waits for nor copies through the host (and a CUDA graph,
    # such as torch.compile's "reduce-overhead" mode makes, can capture it).
    if context.storage is not None:
        return context.storage
    return torch.from_numpy(context.statistics.pack())


# ---- the custom ops (the route torch.compile takes) --------------------------------------------
# The op key is "<options json>\n<group key>".


@torch.library.custom_op("batchnorm::train_forward", mutates_args=())
def _train_forward_op(
    x: Tensor,
    mask: Optional[Tensor],  # noqa: UP045 (torch.library parses the annotations at run time)
    gamma: Optional[Tensor],  # noqa: UP045
    beta: Optional[Tensor],  # noqa: UP045
    moving: list[Tensor],
    adjust_scale: Optional[Tensor],  # noqa: UP045
    adjust_bias: Optional[Tensor],  # noqa: UP045
    key: str,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Training forward: (y, the packed statistics for the backward, the updated moving
    statistics as new tensors)."""
    options = _options_of(key)
    updated = [m.clone() for m in moving]
    y, context = F.forward(
        x,
        _weights(_plain(gamma), _plain(beta), updated),
        options,
        training=True,
        mask=mask,
        adjustment=_adjustment(adjust_scale, adjust_bias),
        communicator=_communicator(key[key.index("\n") + 1 :]),
    )
    return y, _pack(context), updated


@_train_forward_op.register_fake
def _(x, mask, gamma, beta, moving, adjust_scale, adjust_bias, key):  # noqa: ANN001, ANN202
    options = _options_of(key)
    saved = torch.empty(F.packed_size(options, x.shape), dtype=torch.float64, device=x.device)
    return torch.empty_like(x), saved, [torch.empty_like(m) for m in moving]


@torch.library.custom_op("batchnorm::train_backward", mutates_args=())
def _train_backward_op(
    dy: Tensor,
    x: Tensor,
    mask: Optional[Tensor],  # noqa: UP045
    gamma: Optional[Tensor],  # noqa: UP045
    has_beta: bool,
    saved: Tensor,
    key: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta) of a training forward from its packed statistics; dgamma/dbeta are
    empty where the layer has no gamma/beta."""
    context = _training_context(x, mask, gamma, has_beta, saved, key)
    dx, dgamma, dbeta = _parameter_gradients(F.backward(dy, context), context)
    return dx, _or_empty(dgamma, x, _weight_dtype(x)), _or_empty(dbeta, x, _weight_dtype(x))


@_train_backward_op.register_fake
def _(dy, x, mask, gamma, has_beta, saved, key):  # noqa: ANN001, ANN202
    features = _feature_count(x, _options_of(key))
    dtype = _weight_dtype(x)
    dgamma = x.new_empty(features if gamma is not None else 0, dtype=dtype)
    return torch.empty_like(x), dgamma, x.new_empty(features if has_beta else 0, dtype=dtype)


def _train_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    x, mask, gamma, beta, _, _, _, key = inputs
    ctx.save_for_backward(x, mask, gamma, output[1])
    ctx.has_gamma, ctx.has_beta, ctx.key = gamma is not None, beta is not None, key
    ctx.moving_count = len(inputs[4])


def _train_backward(ctx: Any, dy: Tensor, _saved: Any, _moving: Any) -> tuple[Any, ...]:
    x, mask, gamma, saved = ctx.saved_tensors
    dx, dgamma, dbeta = _train_backward_op(dy, x, mask, gamma, ctx.has_beta, saved, ctx.key)
    return (
        dx,
        None,
        dgamma if ctx.has_gamma else None,
        dbeta if ctx.has_beta else None,
        [None] * ctx.moving_count,  # (the structure of the inputs: `moving` is a list)
        None,
        None,
        None,
    )


_train_forward_op.register_autograd(_train_backward, setup_context=_train_setup)


@torch.library.custom_op("batchnorm::infer_forward", mutates_args=())
def _infer_forward_op(
    x: Tensor,
    gamma: Optional[Tensor],  # noqa: UP045
    beta: Optional[Tensor],  # noqa: UP045
    moving_mean: Tensor,
    moving_variance: Tensor,
    key: str,
) -> Tensor:
    """Inference forward with the moving statistics."""
    y, _ = F.forward(
        x,
        _weights(_plain(gamma), _plain(beta), (moving_mean, moving_variance)),
        _options_of(key),
        training=False,
    )
    return y


@_infer_forward_op.register_fake
def _(x, gamma, beta, moving_mean, moving_variance, key):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::infer_backward", mutates_args=())
def _infer_backward_op(
    dy: Tensor,
    x: Tensor,
    gamma: Optional[Tensor],  # noqa: UP045
    has_beta: bool,
    moving_mean: Tensor,
    moving_variance: Tensor,
    key: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta) of an inference forward; empty dgamma/dbeta where absent."""
    options = _options_of(key)
    beta = torch.empty_like(moving_mean) if has_beta else None
    weights = F.Weights(
        **_weights(_plain(gamma), beta, (moving_mean.detach(), moving_variance.detach()))
    )
    context = F.Context(False, x, None, options, weights, None, None)
    dx, dgamma, dbeta = F.backward(dy, context)
    return dx, _or_empty(dgamma, x, moving_mean.dtype), _or_empty(dbeta, x, moving_mean.dtype)


@_infer_backward_op.register_fake
def _(dy, x, gamma, has_beta, moving_mean, moving_variance, key):  # noqa: ANN001, ANN202
    features = moving_mean.shape[0]
    dgamma = moving_mean.new_empty(features if gamma is not None else 0)
    return torch.empty_like(x), dgamma, moving_mean.new_empty(features if has_beta else 0)


def _infer_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, gamma, beta, moving_mean, moving_variance, key = inputs
    ctx.save_for_backward(x, gamma, moving_mean, moving_variance)
    ctx.has_gamma, ctx.has_beta, ctx.key = gamma is not None, beta is not None, key


def _infer_backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
    x, gamma, moving_mean, moving_variance = ctx.saved_tensors
    dx, dgamma, dbeta = _infer_backward_op(
        dy, x, gamma, ctx.has_beta, moving_mean, moving_variance, ctx.key
    )
    return dx, dgamma if ctx.has_gamma else None, dbeta if ctx.has_beta else None, None, None, None


_infer_forward_op.register_autograd(_infer_backward, setup_context=_infer_setup)


# ---- the eager route ---------------------------------------------------------------------------


class _Call:
    """What one eager call needs besides the differentiable tensors."""

    __slots__ = ("training", "weights", "options", "mask", "adjustment", "communicator", "context")

    def __init__(
        self,
        training: bool,
        weights: F.Weights,
        options: F.Options,
        mask: Any,
        adjustment: tuple[Any, Any] | None,
        communicator: Any,
    ) -> None:
        self.training = training
        self.weights = weights
        self.options = options
        self.mask = mask
        self.adjustment = adjustment
        self.communicator = communicator
        self.context: F.Context | None = None


class _Normalize(torch.autograd.Function):
    """The eager call: the kernels run once forward and once backward, the moving statistics are
    updated in place, and this call's own statistics differentiate it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Any, beta: Any, call: _Call) -> Tensor:  # noqa: ARG004
        y, call.context = F.forward(
            x,
            call.weights,
            call.options,
            training=call.training,
            mask=call.mask,
            adjustment=call.adjustment,
            communicator=call.communicator,
        )
        # Saved for autograd's in-place check: x is read again by the backward, gamma's value
        # at this call is what the backward uses.
        ctx.save_for_backward(x, gamma)
        ctx.call = call
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        ctx.saved_tensors  # noqa: B018  (raises if x or gamma was modified in place since)
        dx, dgamma, dbeta = _parameter_gradients(F.backward(dy, ctx.call.context), ctx.call.context)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dgamma if needs[1] else None,
            dbeta if needs[2] else None,
            None,
        )


# ---- the functional form -----------------------------------------------------------------------


def batch_norm(
    x: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    moving_mean: Tensor,
    moving_variance: Tensor,
    *,
    training: bool,
    mask: Tensor | None = None,
    moving_stddev: Tensor | None = None,
    renorm_mean: Tensor | None = None,
    renorm_stddev: Tensor | None = None,
    adjustment: tuple[Tensor | None, Tensor | None] | None = None,
    options: F.Options | None = None,
    process_group: Any = None,
    synchronized: bool = False,
    **keras_options: Any,
) -> Tensor:
    """Keras' batch normalization of `x` with explicit weights (flat vectors of C values, float32;
    float64 for float64 data), differentiable in x, gamma and beta.

    training=True normalizes with the batch statistics (masked, ghost batches, renorm, as the
    options say) and updates `moving_mean`/`moving_variance` (and the renorm statistics) in place;
    training=False uses the moving statistics. The options are Keras' (`axis`, `momentum`,
    `epsilon`, `renorm`, `renorm_clipping`, `renorm_momentum`, `virtual_batch_size`, and `center`/
    `scale`, which say whether gamma/beta are expected) as keywords, or a ready
    `batchnorm.functional.Options` as `options`. `adjustment` is Keras' (scale, bias) as per-feature
    vectors. With `synchronized=True` and an initialized torch.distributed process group (the
    default one, or `process_group`), the statistics are those of every rank's batch."""
    if options is None:
        options = F.Options(**keras_options)
    elif keras_options:
        raise TypeError("pass the options either as `options` or as keywords, not both")
    moving = [moving_mean, moving_variance]
    if options.renorm:
        moving += [moving_stddev, renorm_mean, renorm_stddev]
    scale, bias = adjustment if adjustment is not None else (None, None)
    group = _group_key(synchronized, process_group)
    if torch.compiler.is_compiling():
        return _compiled_call(x, mask, gamma, beta, moving, scale, bias, options, group, training)
    call = _Call(
        training,
        F.Weights(**_weights(_plain(gamma), _plain(beta), [_plain(m) for m in moving])),
        options,
        mask,
        _adjustment(_plain(scale), _plain(bias)),
        _communicator(group) if training else None,
    )
    return _Normalize.apply(x, gamma, beta, call)


def _compiled_call(
    x: Tensor,
    mask: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    moving: list[Tensor],
    scale: Tensor | None,
    bias: Tensor | None,
    options: F.Options,
    group: str,
    training: bool,
) -> Tensor:
    key = options.json + "\n" + group
    if not training:
        return _infer_forward_op(x, gamma, beta, moving[0], moving[1], key)
    y, _, updated = _train_forward_op(x, mask, gamma, beta, moving, scale, bias, key)
    with torch.no_grad():
        for target, value in zip(moving, updated):
            target.copy_(value)
    return y


# ---- the module --------------------------------------------------------------------------------


class _RegularizerLoss(torch.autograd.Function):
    """A Keras regularizer's penalty as a differentiable scalar (its value and gradient come
    from the regularizer itself, so every accepted regularizer works)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, regularizer: Any, shape: tuple[int, ...]) -> Tensor:  # noqa: ARG004
        value = weight.detach().cpu().double().numpy().reshape(shape)
        ctx.gradient = np.asarray(regularizers.gradient(regularizer, value)).reshape(-1)
        return weight.new_tensor(float(regularizer(value)))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, None, None]:
        gradient = torch.from_numpy(ctx.gradient).to(grad.device, grad.dtype)
        return grad * gradient, None, None


class BatchNormalization(nn.modules.lazy.LazyModuleMixin, nn.Module):
    """Keras' BatchNormalization as a PyTorch module.

    `num_features` is the feature shape: an int for one feature axis, a tuple for several
    (their sizes in axis order); None builds the module at its first call, as PyTorch's lazy
    modules do. Every other argument is Keras' (see `batchnorm.BatchNormalization`), with Keras'
    defaults — momentum 0.99, epsilon 1e-3, axis -1 (channels-last: pass axis=1 for NCHW) —
    plus `process_group` for `synchronized=True` over torch.distributed.

    Parameters `gamma`, `beta` (absent with scale=False/center=False); buffers `moving_mean`,
    `moving_variance` and with renorm `moving_stddev`, `renorm_mean`, `renorm_stddev`. In
    `train()` mode with `trainable` True a call normalizes with the batch statistics and updates
    the moving ones; in `eval()` mode, or with `trainable=False` (Keras' frozen layer), it uses
    the moving statistics and updates nothing."""

    cls_to_become = None  # stays this class once built (lazy modules may change class)

    def __init__(
        self,
        num_features: int | Sequence[int] | None = None,
        *,
        process_group: Any = None,
        device: Any = None,
        **keras_arguments: Any,
    ) -> None:
        super().__init__()
        if "communicator" in keras_arguments:
            raise TypeError(
                "communicator is the MPI process group of batchnorm.BatchNormalization; this "
                "module synchronizes over torch.distributed (process_group=)"
            )
        self._setup(_KerasLayer(**keras_arguments), num_features, process_group, device)

    def _setup(
        self, keras: _KerasLayer, num_features: Any, process_group: Any, device: Any
    ) -> None:
        if keras.adjustment is not None and not callable(keras.adjustment):
            raise TypeError("adjustment must be a callable taking the input shape")
        self.keras_layer = keras
        self.process_group = process_group
        self._group = _group_key(keras.synchronized, process_group)
        self._bound: F.Weights | None = None
        self._bound_key: tuple[int, ...] = ()
        self._feature_shape: tuple[int, ...] | None = None
        self._accepted_shape: tuple[int, ...] = ()  # the last input shape checked
        # Read by every call, and by torch.compile's tracing, which must not enter the extension.
        self._options = keras._options
        names = keras._options.weight_names()
        self._moving_names = [name for name in names if name in _MOVING]
        variable_dtype = torch.float64 if keras._policy.variable == "float64" else torch.float32
        factory = {"device": device, "dtype": variable_dtype}
        for name in names:
            if name in ("gamma", "beta"):
                param = nn.UninitializedParameter(requires_grad=keras.trainable, **factory)
                self.register_parameter(name, param)
            else:
                self.register_buffer(name, nn.UninitializedBuffer(**factory))
        if num_features is not None:
            shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
            if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
                raise ValueError(
                    f"num_features must be a positive int or a tuple of them, got {num_features!r}"
                )
            self._build(keras._options.input_shape_for(shape))

    # -- Keras' attributes --
    @property
    def trainable(self) -> bool:
        return self.keras_layer.trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self.keras_layer.trainable = value
        for name in ("gamma", "beta"):
            if name in self._parameters:
                self._parameters[name].requires_grad_(bool(value))

    @property
    def options(self) -> F.Options:
        """The validated Keras options (axis, momentum, epsilon, renorm, ...)."""
        return self.keras_layer._options

    def get_config(self) -> dict[str, Any]:
        """Keras' layer config (loadable by Keras and by `from_keras`)."""
        return self.keras_layer.get_config()

    def _apply(self, fn: Any, recurse: bool = True) -> BatchNormalization:
        # module.half() / .to(torch.bfloat16) convert every floating tensor; Keras' mixed
        # policies keep the weights of a layer fed 16-bit data in float32, and so do the
        # kernels: such conversions are undone here (devices move as asked).
        super()._apply(fn, recurse)
        for tensors in (self._parameters, self._buffers):
            for tensor in tensors.values():
                lazy = isinstance(tensor, nn.parameter.UninitializedTensorMixin)
                if tensor is not None and not lazy and tensor.dtype in _HALF:
                    tensor.data = tensor.data.float()
        return self

    # -- building --
    def _build(self, input_shape: Sequence[int]) -> None:
        """Keras' initial weights for inputs of `input_shape`, from the layer's initializers."""
        keras = self.keras_layer
        keras.build(list(input_shape))
        self._feature_shape = tuple(keras._feature_shape)
        for name, value in zip(self.options.weight_names(), keras.get_weights()):
            tensor = getattr(self, name)
            # In the dtype the tensor was given (float32, or module.double() before the build;
            # float32 for a module made 16-bit, see _apply).
            tensor.materialize(
                (value.size,), dtype=torch.float32 if tensor.dtype in _HALF else None
            )
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(value.reshape(-1)))

    def initialize_parameters(self, x: Tensor, mask: Tensor | None = None) -> None:  # noqa: ARG002
        """Builds the weights for the first input's feature sizes (lazy modules' hook)."""
        if self.has_uninitialized_params():
            self._build(x.shape)

    # -- the call --
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalizes x (any of float16, bfloat16, float32, float64; channels_last and other
        strides read in place); `mask` selects the positions the batch statistics use (Keras'
        rank - 1 form, or x's rank with sizes 1 where it broadcasts)."""
        keras = self.keras_layer
        training = self.training and keras.trainable
        gamma, beta = self._parameters.get("gamma"), self._parameters.get("beta")
        moving = [self._buffers[name] for name in self._moving_names]
        adjustment = self._adjustment(x) if training and keras.adjustment is not None else None
        scale, bias = adjustment if adjustment is not None else (None, None)
        if torch.compiler.is_compiling():  # (the ops check the input when they run)
            return _compiled_call(
                x, mask, gamma, beta, moving, scale, bias, self._options, self._group, training
            )
        self._check_input(x)
        call = _Call(
            training,
            self._bound_weights(gamma, beta, moving),
            self._options,
            mask,
            adjustment,
            _communicator(self._group) if training else None,
        )
        return _Normalize.apply(x, gamma, beta, call)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.shape == self._accepted_shape:
            return
        schema = self.options.schema(list(x.shape))
        if self._feature_shape is None:  # a state_dict loaded into an unbuilt module
            loaded = self._buffers["moving_mean"].numel()
            if schema.features != loaded:
                raise ValueError(
                    f"the loaded weights have {loaded} features but the input {tuple(x.shape)} "
                    f"has {schema.features} on axes {list(schema.axes)}"
                )
            self.keras_layer.build(list(x.shape))
            self._feature_shape = tuple(schema.feature_shape)
        if tuple(schema.feature_shape) != self._feature_shape:
            raise ValueError(
                f"expected inputs with feature sizes {self._feature_shape} on axes "
                f"{list(schema.axes)}, got shape {tuple(x.shape)}"
            )
        self._accepted_shape = x.shape

    def _bound_weights(
        self, gamma: Tensor | None, beta: Tensor | None, moving: list[Tensor]
    ) -> F.Weights:
        # Bound again only when a tensor's storage changed (module.to(), a new parameter).
        tensors = [t for t in (gamma, beta, *moving) if t is not None]
        key = tuple(t.data_ptr() for t in tensors) + tuple(id(t) for t in tensors)
        if key != self._bound_key or self._bound is None:
            self._bound = F.Weights(**_weights(_plain(gamma), _plain(beta), moving))
            self._bound_key = key
        return self._bound

    def _adjustment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        result = self.keras_layer.adjustment(tuple(x.shape))
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ValueError("adjustment must return a pair (scale, bias)")
        features = math.prod(self._feature_shape or ())
        dtype = self._buffers["moving_mean"].dtype
        vectors = []
        for label, value in zip(("scale", "bias"), result):
            tensor = torch.as_tensor(value, dtype=dtype, device=x.device)
            if tensor.numel() == features:
                vectors.append(tensor.reshape(-1).contiguous())
            elif tensor.numel() == 1:
                vectors.append(tensor.reshape(1).expand(features).contiguous())
            else:
                raise ValueError(
                    f"adjustment {label}: {tensor.numel()} values for {features} features"
                )
        return vectors[0], vectors[1]

    # -- Keras' regularizers, constraints and weights --
    def regularization_losses(self) -> list[Tensor]:
        """The penalties of gamma_regularizer and beta_regularizer on the current weights, as
        differentiable scalars to add to the loss (what Keras adds to a model's losses)."""
        keras = self.keras_layer
        shape = self._keras_shape()
        losses = []
        for name, regularizer in (
            ("gamma", keras.gamma_regularizer),
            ("beta", keras.beta_regularizer),
        ):
            if regularizer is not None and name in self._parameters:
                losses.append(_RegularizerLoss.apply(self._parameters[name], regularizer, shape))
        return losses

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Applies gamma_constraint and beta_constraint to the weights in place: call it after
        `optimizer.step()`, as Keras' optimizer does after each update."""
        keras = self.keras_layer
        shape = self._keras_shape()
        for name, constraint in (
            ("gamma", keras.gamma_constraint),
            ("beta", keras.beta_constraint),
        ):
            if constraint is None or name not in self._parameters:
                continue
            param = self._parameters[name]
            value = param.detach().cpu().numpy().reshape(shape)
            constrained = np.asarray(constraint(value), dtype=value.dtype).reshape(-1)
            param.copy_(torch.from_numpy(constrained))

    def _keras_shape(self) -> tuple[int, ...]:
        if self.has_uninitialized_params():
            raise ValueError("the module is not built yet: call it once (or give num_features)")
        return tuple(self.keras_layer._param_shape)

    def get_weights(self) -> list[np.ndarray]:
        """The weights in Keras' order and shapes (host NumPy copies)."""
        shape = self._keras_shape()
        return [
            getattr(self, name).detach().cpu().numpy().reshape(shape).copy()
            for name in self.options.weight_names()
        ]

    @torch.no_grad()
    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets every weight from Keras' list (its order; any Keras layout of the same size).
        Everything is checked before anything changes."""
        names = self.options.weight_names()
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(
                f"expected {len(names)} weights ({', '.join(names)}), got {len(weights)}"
            )
        values = [np.asarray(w) for w in weights]
        if self.has_uninitialized_params():  # one feature axis of that many features
            if not isinstance(self.options.axis, int) and len(self.options.axis) > 1:
                raise ValueError("call the module once before set_weights: it has several axes")
            self._build(self.options.input_shape_for((values[0].size,)))
        features = getattr(self, names[0]).numel()
        for name, value in zip(names, values):
            if value.size != features:
                raise ValueError(f"{name}: expected {features} values, got shape {value.shape}")
        for name, value in zip(names, values):
            target = getattr(self, name)
            target.copy_(torch.from_numpy(value.reshape(-1).astype(np.float64)))

    @classmethod
    def from_keras(
        cls,
        config: Mapping[str, Any] | _KerasLayer,
        weights: Sequence[Any] | None = None,
        *,
        process_group: Any = None,
        device: Any = None,
    ) -> BatchNormalization:
        """A module from a Keras BatchNormalization: a tf.keras 2 or Keras 3 layer config (the
        layer's `get_config()`, or a model config's `{"class_name": ..., "config": ...}` entry)
        or a `batchnorm.BatchNormalization`, with Keras' weight list (`layer.get_weights()`; a
        built batchnorm layer gives its own when `weights` is None)."""
        keras, weights = copy_for_module(config, weights)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        built = keras.built
        module._setup(keras, None, process_group, device)
        if built:
            module._build(keras._build_input_shape)
        if weights is not None:
            module.set_weights(weights)
        return module

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"num_features={self._feature_shape}, axis={o.axis}, momentum={o.momentum}, "
            f"epsilon={o.epsilon}, center={o.center}, scale={o.scale}, renorm={o.renorm}, "
            f"virtual_batch_size={o.virtual_batch_size}, trainable={self.trainable}"
        )
