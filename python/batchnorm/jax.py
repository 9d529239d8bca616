"""Keras-exact batch normalization for JAX: a pure function that works under `jax.jit`,
`jax.grad` and `jax.vmap`, and a Flax NNX module with Keras' weight names.

    >>> import jax, jax.numpy as jnp
    >>> import batchnorm.jax as bnj
    >>> params = {"gamma": jnp.ones(3), "beta": jnp.zeros(3)}
    >>> state = {"moving_mean": jnp.zeros(3), "moving_variance": jnp.ones(3)}
    >>> x = jnp.arange(24.0).reshape(8, 3)
    >>> step = jax.jit(bnj.batch_norm, static_argnames="training")
    >>> y, new_state = step(x, params, state, training=True)

`batch_norm` is functional, as JAX wants: the updated moving statistics come back as new arrays,
nothing is written in place. Its gradient is a `jax.custom_vjp` whose backward runs the
package's backward kernels on the statistics the forward saved (the forward is not run again).

XLA reaches the kernels by one of two routes (`route=`). The XLA FFI handlers (an opt-in build,
`ffi_available()`) are called by XLA with its own CPU buffers: everything is read and written
where XLA keeps it, with no copy and no Python in the step. `jax.pure_callback` works in every
build, at the price of copies: JAX hands the callback copies of its arguments (x; dy and x in
the backward), the kernels write new host arrays, which XLA copies into its own buffers (y; dx),
and each call pays for the trip through Python. On a GPU, XLA moves the arguments to the host and
the results back, and the CPU kernels do the work. docs/jax.md has
the measured costs. Under `jax.vmap` each member of the mapped axis is normalized on
its own (its own batch statistics and moving statistics), the kernels being called once per
member (`vmap_method="sequential"`).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _core
from . import functional as F
from ._arrays import CPU

__all__ = ["BatchNormalization", "batch_norm", "ffi_available"]  # noqa: F822 (BatchNormalization: __getattr__)

_MOVING = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
_FLOATS = ("float16", "bfloat16", "float32", "float64")
# Under vmap the callbacks run once per member of the mapped axis (see the module docstring).
_VMAP = "sequential"


# ---- the host side: what the callbacks run ----------------------------------------------------
# Each callback gets the options as their JSON string (static in the traced program), a layout
# saying which of its optional arrays are present (pure_callback passes arrays only), and the
# arrays (host copies JAX made for the callback, read as NumPy views).


def _expand(layout: tuple[bool, ...], present: Sequence[Any]) -> list[Any]:
    values = iter(present)
    return [np.asarray(next(values)) if here else None for here in layout]


def _writable(vector: Any) -> Any:
    # Weights are bound as writable vectors (the kernels update the moving ones in place), and
    # XLA's buffers are read-only: the few per-feature values are copied.
    return None if vector is None else np.array(vector)


def _weight_dtype(dtype: Any) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _gradients(result: tuple[Any, Any, Any], dtype: np.dtype) -> tuple[Any, ...]:
    """(dx, dgamma, dbeta) with an empty vector for an absent weight (a callback returns arrays)."""
    dx, dgamma, dbeta = result
    empty = np.empty(0, dtype)
    return dx, empty if dgamma is None else dgamma, empty if dbeta is None else dbeta


def _train_host(key: str, layout: tuple[bool, ...], *arrays: Any) -> tuple[np.ndarray, ...]:
    """(y, the saved statistics, the updated moving statistics) of a training forward."""
    x, gamma, beta, mask, scale, bias, *moving = _expand(layout, arrays)
    updated = [np.array(m) for m in moving]  # the results: new arrays the kernels update
    weights = dict(zip(_MOVING, updated))
    weights.update(gamma=_writable(gamma), beta=_writable(beta))
    y, context = F.forward(
        x,
        weights,
        F.Options.from_json(key),
        training=True,
        mask=mask,
        adjustment=None if scale is None else (_writable(scale), _writable(bias)),
    )
    # The float64 statistics travel as their bit pattern: JAX has float64 only with x64 enabled.
    return (y, context.statistics.pack().view(np.uint32), *updated)


def _train_backward_host(key: str, layout: tuple[bool, ...], *arrays: Any) -> tuple[Any, ...]:
    """(dx, dgamma, dbeta) of a training forward, from the statistics it saved."""
    options = F.Options.from_json(key)
    dy, x, gamma, mask, saved = _expand(layout, arrays)
    dtype = _weight_dtype(x.dtype)
    # The training backward reads gamma, and of beta only whether it exists.
    beta = np.empty(options.schema(list(x.shape)).features, dtype) if options.center else None
    weights = {"gamma": _writable(gamma), "beta": beta}
    context = F.training_context(x, mask, weights, options, saved.view(np.float64))
    return _gradients(F.backward(dy, context), dtype)


def _infer_host(key: str, layout: tuple[bool, ...], *arrays: Any) -> np.ndarray:
    x, gamma, beta, mean, variance = _expand(layout, arrays)
    vectors = (gamma, beta, mean, variance)
    weights = dict(
        zip(("gamma", "beta", "moving_mean", "moving_variance"), map(_writable, vectors))
    )
    y, _ = F.forward(x, weights, F.Options.from_json(key), training=False)
    return y


def _infer_backward_host(key: str, layout: tuple[bool, ...], *arrays: Any) -> tuple[Any, ...]:
    options = F.Options.from_json(key)
    dy, x, gamma, mean, variance = _expand(layout, arrays)
    beta = np.empty_like(mean) if options.center else None
    weights = F.Weights(
        gamma=_writable(gamma),
        beta=beta,
        moving_mean=_writable(mean),
        moving_variance=_writable(variance),
    )
    context = F.Context(False, x, None, options, weights, None, None)
    return _gradients(F.backward(dy, context), mean.dtype)


# ---- the FFI route --------------------------------------------------------------------------

_HANDLERS = {
    "batchnorm_train_forward": "BatchnormTrainForward",
    "batchnorm_train_backward": "BatchnormTrainBackward",
    "batchnorm_infer_forward": "BatchnormInferForward",
    "batchnorm_infer_backward": "BatchnormInferBackward",
}
_ROUTES = ("auto", "ffi", "callback")


@functools.cache
def ffi_available() -> bool:
    """Whether the XLA FFI handlers are here: built into the package (the
    BATCHNORM_BUILD_JAX_FFI option), or built separately against the installed package and
    named by the environment variable BATCHNORM_JAX_FFI_LIBRARY. They are registered with JAX
    on the first call that finds them."""
    named = os.environ.get("BATCHNORM_JAX_FFI_LIBRARY")
    libraries = [Path(named)] if named else sorted(Path(__file__).parent.glob("_jax_ffi.*"))
    if not libraries:
        return False
    try:
        library = ctypes.CDLL(str(libraries[0]))
    except OSError as error:
        raise ImportError(f"cannot load the XLA FFI handlers {libraries[0]}: {error}") from error
    for target, symbol in _HANDLERS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
    return True


def _route(route: str) -> str:
    if route not in _ROUTES:
        raise ValueError(f"route must be one of {', '.join(_ROUTES)}, got {route!r}")
    if route == "ffi" and not ffi_available():
        raise ValueError(
            "route='ffi': this build of batchnorm has no XLA FFI handlers; build it with "
            "-C cmake.define.BATCHNORM_BUILD_JAX_FFI=ON (and jax installed), or use "
            "route='callback'"
        )
    if route == "auto":
        return "ffi" if ffi_available() else "callback"
    return route


# The core's option fields besides the axes (scalars, each an FFI attribute of its own name).
_SCALAR_OPTIONS = tuple(n for n in dir(_core.Options) if not n.startswith("_") and n != "axes")


@functools.lru_cache(maxsize=256)
def _attribute_values(text: str) -> tuple[tuple[str, Any], ...]:
    core = F.Options.from_json(text).core
    values: list[tuple[str, Any]] = [("axes", np.asarray(core.axes, np.int64))]
    for name in _SCALAR_OPTIONS:
        value = getattr(core, name)
        kind = (
            bool if isinstance(value, bool) else np.int64 if isinstance(value, int) else np.float64
        )
        values.append((name, kind(value)))
    return tuple(values)


def _attributes(text: str) -> dict[str, Any]:
    """The options as FFI attributes (typed as the handlers read them)."""
    return dict(_attribute_values(text))


# ---- the traced side: kernel calls and their custom VJPs -------------------------------------


def _kernel(target: str, host: Any, key: tuple[str, str], shapes: Any, arrays: Sequence[Any]):
    """The results of one kernel call: through the FFI handler `target` on the CPU when the
    route says so, else through `host` in a callback. `key` is (options JSON, route)."""
    text, route = key
    layout = tuple(a is not None for a in arrays)
    present = [a for a in arrays if a is not None]

    def callback(*present: Any) -> Any:
        return jax.pure_callback(
            lambda *a: host(text, layout, *a), shapes, *present, vmap_method=_VMAP
        )

    if route == "callback":
        return callback(*present)
    attributes = _attributes(text)
    # Which optional arrays are present besides gamma and beta (the options say those).
    attributes.update(has_mask=layout[3], has_adjustment=len(layout) > 4 and layout[4])

    def handler(*present: Any) -> Any:
        call = jax.ffi.ffi_call(target, shapes, vmap_method=_VMAP)
        return call(*present, **attributes)

    # The handlers are registered for the CPU; on other platforms the callback route runs.
    return jax.lax.platform_dependent(*present, cpu=handler, default=callback)


def _struct(shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _gradient_shapes(x: Any, options: F.Options) -> tuple[jax.ShapeDtypeStruct, ...]:
    features = options.schema(list(x.shape)).features
    dtype = _weight_dtype(x.dtype)
    return (
        _struct(x.shape, x.dtype),
        _struct((features if options.scale else 0,), dtype),
        _struct((features if options.center else 0,), dtype),
    )


def _train_call(key: str, x: Any, gamma: Any, beta: Any, mask: Any, adjust: Any, moving: Any):
    options = F.Options.from_json(key[0])
    words = 2 * F.packed_size(options, x.shape)  # float64 statistics as uint32 pairs
    shapes = (
        _struct(x.shape, x.dtype),
        _struct((words,), jnp.uint32),
        *(_struct(m.shape, m.dtype) for m in moving),
    )
    y, saved, *updated = _kernel(
        "batchnorm_train_forward",
        _train_host,
        key,
        shapes,
        [x, gamma, beta, mask, *adjust, *moving],
    )
    return y, saved, tuple(updated)


def _train(key: str, x: Any, gamma: Any, beta: Any, mask: Any, adjust: Any, moving: Any):
    y, _, updated = _train_call(key, x, gamma, beta, mask, adjust, moving)
    return y, updated


def _train_forward(key: str, x: Any, gamma: Any, beta: Any, mask: Any, adjust: Any, moving: Any):
    y, saved, updated = _train_call(key, x, gamma, beta, mask, adjust, moving)
    return (y, updated), (x, gamma, mask, saved)


def _train_backward(key: str, residuals: Any, cotangents: Any) -> tuple[Any, ...]:
    x, gamma, mask, saved = residuals
    options = F.Options.from_json(key[0])
    dx, dgamma, dbeta = _kernel(
        "batchnorm_train_backward",
        _train_backward_host,
        key,
        _gradient_shapes(x, options),
        [cotangents[0], x, gamma, mask, saved],
    )
    # The mask, Keras' adjustment and the moving statistics are constants (as in Keras): they
    # get no gradient, and the updated moving statistics pass none back.
    return (
        dx,
        dgamma if options.scale else None,
        dbeta if options.center else None,
        None,
        (None, None),
        (None,) * sum(name in _MOVING for name in options.weight_names()),
    )


_train = jax.custom_vjp(_train, nondiff_argnums=(0,))
_train.defvjp(_train_forward, _train_backward)


def _infer(key: str, x: Any, gamma: Any, beta: Any, mean: Any, variance: Any) -> Any:
    return _kernel(
        "batchnorm_infer_forward",
        _infer_host,
        key,
        _struct(x.shape, x.dtype),
        [x, gamma, beta, mean, variance],
    )


def _infer_forward(key: str, x: Any, gamma: Any, beta: Any, mean: Any, variance: Any):
    return _infer(key, x, gamma, beta, mean, variance), (x, gamma, mean, variance)


def _infer_backward(key: str, residuals: Any, dy: Any) -> tuple[Any, ...]:
    x, gamma, mean, variance = residuals
    options = F.Options.from_json(key[0])
    dx, dgamma, dbeta = _kernel(
        "batchnorm_infer_backward",
        _infer_backward_host,
        key,
        _gradient_shapes(x, options),
        [dy, x, gamma, mean, variance],
    )
    # The moving statistics are constants of the inference call, as in Keras.
    return dx, dgamma if options.scale else None, dbeta if options.center else None, None, None


_infer = jax.custom_vjp(_infer, nondiff_argnums=(0,))
_infer.defvjp(_infer_forward, _infer_backward)


# ---- the functional form -----------------------------------------------------------------------


def _vector(value: Any, name: str, features: int, dtype: np.dtype) -> Any:
    array = jnp.asarray(value)
    if array.size != features:
        raise ValueError(f"{name}: expected {features} values, got shape {tuple(array.shape)}")
    return array.reshape(features).astype(dtype)


def _check_mask(mask: Any, x: Any) -> Any:
    """The mask as a boolean array, its shape checked now. A numeric mask must hold 0/1: checked
    here when its values are known (outside jit), read as "nonzero is valid" when traced."""
    mask = jnp.asarray(mask)
    # prepare_mask checks the shape rules on stand-ins of the right shapes (no data).
    F.prepare_mask(
        np.broadcast_to(np.zeros((), bool), mask.shape),
        np.broadcast_to(np.zeros((), np.float32), x.shape),
        True,
        CPU,
    )
    if mask.dtype == bool:
        return mask
    if not isinstance(mask, jax.core.Tracer):
        F.prepare_mask(
            np.asarray(mask), np.broadcast_to(np.zeros((), np.float32), x.shape), True, CPU
        )
    return mask != 0


def batch_norm(
    x: Any,
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    *,
    training: bool,
    mask: Any = None,
    adjustment: tuple[Any, Any] | None = None,
    options: F.Options | None = None,
    route: str = "auto",
    **keras_options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Keras' batch normalization of `x` -> `(y, new_state)`; pure, so it composes with `jit`,
    `grad`/`value_and_grad` and `vmap`.

    `params` holds `gamma` and `beta` (each absent, or None, with scale=False/center=False);
    `state` holds `moving_mean`, `moving_variance` and with renorm `moving_stddev`,
    `renorm_mean`, `renorm_stddev`. Each is a vector of C values (C the product of the feature
    sizes) in any Keras layout of them; they compute in float32 (float64 for float64 data), and
    `new_state` has state's shapes and dtypes. training=True normalizes with the batch
    statistics (masked, ghost batches, renorm, as the options say) and returns the updated
    moving statistics; training=False uses the moving statistics and returns `state` as it is
    (Keras' inference and frozen layers). Gradients flow to x, gamma and beta.

    The options are Keras' (`axis`, `momentum`, `epsilon`, `center`, `scale`, `renorm`,
    `renorm_clipping`, `renorm_momentum`, `virtual_batch_size`) as keywords, or a ready
    `batchnorm.functional.Options` as `options`. `mask` selects the positions the statistics
    use (Keras' rank - 1 form, or x's rank with sizes 1 where it broadcasts); `adjustment` is
    Keras' (scale, bias) pair of per-feature vectors. `training` must be a Python bool (static
    under `jit`: `static_argnames="training"`).

    `route` picks how XLA reaches the kernels: "ffi" (the XLA FFI handlers, zero-copy on the
    CPU; builds made with BATCHNORM_BUILD_JAX_FFI), "callback" (`jax.pure_callback`, every
    build) or "auto" (the handlers where built). On other platforms than the CPU the callback
    route runs in either case."""
    if options is None:
        options = F.Options(**keras_options)
    elif keras_options:
        raise TypeError("pass the options either as `options` or as keywords, not both")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(
            f"training must be a Python bool (a static argument under jit), got {training!r}"
        )
    x = jnp.asarray(x)
    if x.dtype.name not in _FLOATS:
        raise TypeError(f"x: expected a floating-point array ({', '.join(_FLOATS)}), got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have rank >= 1")
    features = options.schema(list(x.shape)).features
    dtype = _weight_dtype(x.dtype)
    gamma, beta = _parameters(params, options, features, dtype)
    names = [name for name in options.weight_names() if name in _MOVING]
    unknown = set(state) - set(names)
    if unknown:
        raise ValueError(f"state: unexpected entries {sorted(unknown)}; expected {names}")
    missing = [name for name in names if state.get(name) is None]
    if missing:
        raise ValueError(f"state: missing {missing} (these options need {names})")
    moving = tuple(_vector(state[name], f"state[{name!r}]", features, dtype) for name in names)
    key = (options.json, _route(route))
    if not training:
        y = _infer(key, x, gamma, beta, moving[0], moving[1])
        return y, dict(state)
    if options.virtual_batch_size and x.shape[0] % options.virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size {options.virtual_batch_size} must divide the batch size "
            f"{x.shape[0]}"
        )
    if mask is not None:
        mask = _check_mask(mask, x)
    adjust = (None, None)
    if adjustment is not None:
        if not (isinstance(adjustment, (tuple, list)) and len(adjustment) == 2):
            raise ValueError("adjustment must be a pair (scale, bias)")
        adjust = tuple(
            jnp.broadcast_to(_vector_or_scalar(v, label, features), (features,)).astype(dtype)
            for v, label in zip(adjustment, ("scale", "bias"))
        )
    y, updated = _train(key, x, gamma, beta, mask, adjust, moving)
    new_state = {
        name: value.reshape(jnp.shape(state[name])).astype(jnp.asarray(state[name]).dtype)
        for name, value in zip(names, updated)
    }
    return y, new_state


def _vector_or_scalar(value: Any, label: str, features: int) -> Any:
    array = jnp.asarray(value)
    if array.size == 1:
        return array.reshape(())
    if array.size != features:
        raise ValueError(f"adjustment {label}: {array.size} values for {features} features")
    return array.reshape(features)


def _parameters(
    params: Mapping[str, Any], options: F.Options, features: int, dtype: np.dtype
) -> tuple[Any, Any]:
    unknown = set(params) - {"gamma", "beta"}
    if unknown:
        raise ValueError(f"params: unexpected entries {sorted(unknown)}; expected gamma, beta")
    result = []
    for name, wanted, flag in (
        ("gamma", options.scale, "scale"),
        ("beta", options.center, "center"),
    ):
        value = params.get(name)
        if wanted and value is None:
            raise ValueError(f"params: {name} is missing ({flag}=True)")
        if not wanted and value is not None:
            raise ValueError(f"params: {name} given, but {flag}=False has no {name}")
        result.append(
            None if value is None else _vector(value, f"params[{name!r}]", features, dtype)
        )
    return result[0], result[1]


def __getattr__(name: str) -> Any:
    # The Flax module is imported on first use: batchnorm.jax itself needs JAX only.
    if name == "BatchNormalization":
        from ._flax import BatchNormalization

        return BatchNormalization
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
