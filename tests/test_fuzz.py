"""Property-based fuzzing of the Python API (hypothesis): random ranks, shapes with 0, 1 and prime
sizes, strided views (transposed, stepped, negative, stride-0 broadcasts), dtypes, axes, masks,
every option and `out=`. Each case either matches the float64 reference (tests/reference.py) or
raises ValueError/TypeError with the weights unchanged; the inputs are never written.

The default profile (fixed seed, a few thousand cases) runs with the suite; the long one is
`pytest tests/test_fuzz.py --hypothesis-profile=long` or `BATCHNORM_FUZZ=long` (see conftest.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

import batchnorm
from batchnorm import functional as F
from batchnorm._dtypes import data_dtype, policy_from

from reference import ReferenceBN

ml_dtypes = pytest.importorskip("ml_dtypes")
# The float64 reference meets the NaN and infinities the cases inject.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 11, 13]
MAX_ELEMENTS = 1500
LARGE_ELEMENTS = 70_000
FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
OTHER_DTYPES = ["int8", "uint8", "int32", "int64", "bool"]
# Per element: |actual - reference| <= tol * (1 + |reference|); 16-bit results are rounded to
# 16 bits (a unit in the last place is 2^-10, bfloat16 2^-7) on top of float32 arithmetic.
TOLERANCE = {"float16": 3e-3, "bfloat16": 2.4e-2, "float32": 2e-4, "float64": 1e-7}
ERRORS = (ValueError, TypeError)


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@st.composite
def shapes(draw: st.DrawFn, min_rank: int = 1, max_rank: int = 6) -> tuple[int, ...]:
    rank = draw(st.integers(min_rank, max_rank))
    if rank > 1 and draw(st.integers(0, 29)) == 0:
        # Now and then one large enough for the parallel passes (a team per 16K elements).
        shape = [draw(st.sampled_from([2, 3, 7, 8, 16])) for _ in range(rank - 1)]
        shape.insert(draw(st.integers(0, rank - 1)), LARGE_ELEMENTS // math.prod(shape))
        return tuple(shape)
    shape = [draw(st.sampled_from(SIZES)) for _ in range(rank)]
    while math.prod(shape) > MAX_ELEMENTS:
        shape[int(np.argmax(shape))] //= 2
    return tuple(shape)


def values(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: str, spread: float, specials: bool
) -> Any:
    """Data of `dtype`: a random location and spread for floats, small integers, booleans."""
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith(("int", "uint")):
        low = 0 if dtype.startswith("u") else -20
        return rng.integers(low, 20, shape).astype(dtype)
    loc = rng.normal(0.0, 3.0)
    data = rng.normal(loc, spread, shape)
    if specials and data.size and rng.random() < 0.1:
        # A NaN or an infinity: it must stay within its feature (and ghost batch).
        data.flat[rng.integers(data.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return data.astype(np_dtype(dtype))


@st.composite
def views(draw: st.DrawFn, base_values: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """An array of `shape` with the values of `base_values(shape)`, laid out as a random view of
    a larger buffer; returns (view, the buffer it reads) so the test can check nothing wrote it."""
    rank = len(shape)
    kind = draw(st.sampled_from(["contiguous", "transposed", "stepped", "negative", "broadcast"]))
    if kind == "broadcast":
        # Stride 0 along some axes: values of a smaller array repeated (a read-only view).
        small = tuple(1 if draw(st.booleans()) else n for n in shape)
        buffer = base_values(small)
        return np.broadcast_to(buffer, shape), buffer
    if kind == "transposed" and rank > 1:
        order = draw(st.permutations(range(rank)))
        buffer = np.ascontiguousarray(base_values(tuple(shape[a] for a in order)))
        return buffer.transpose(np.argsort(order)), buffer
    if kind in ("stepped", "negative"):
        steps = [draw(st.sampled_from([1, 2, 3])) for _ in range(rank)]
        buffer = base_values(tuple(n * s for n, s in zip(shape, steps)))
        view = buffer[tuple(slice(None, None, s) for s in steps)]
        if kind == "negative":
            flips = tuple(slice(None, None, -1 if draw(st.booleans()) else 1) for _ in range(rank))
            view = view[flips]
        return view, buffer
    buffer = base_values(shape)
    return buffer, buffer


@dataclass
class Case:
    shape: tuple[int, ...]
    dtype: str
    config: dict[str, Any]
    policy: str | None
    weights_seed: int
    training: bool
    mask: Any
    x: Any
    buffers: list[Any] = field(default_factory=list)

    def __repr__(self) -> str:  # hypothesis prints failing cases: the data only in summary
        mask = None if self.mask is None else (self.mask.shape, self.mask.dtype.name)
        return (
            f"Case(shape={self.shape}, dtype={self.dtype}, strides={self.x.strides}, "
            f"config={self.config}, policy={self.policy}, training={self.training}, "
            f"mask={mask}, weights_seed={self.weights_seed})"
        )


def axis_choice(draw: st.DrawFn, rank: int) -> Any:
    """Mostly valid feature axes (an int or a list, negative or not); now and then an axis out of
    range or a repeated one."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from([rank, -rank - 1, [0, 0], [rank - 1, -1]]))
    count = draw(st.integers(1, min(rank, 3)))
    axes = draw(st.permutations(range(rank)))[:count]
    axes = [a - rank if draw(st.booleans()) else a for a in axes]
    if count == 1 and draw(st.booleans()):
        return axes[0]
    return axes


@st.composite
def configs(draw: st.DrawFn, shape: tuple[int, ...]) -> dict[str, Any]:
    config: dict[str, Any] = {"axis": axis_choice(draw, len(shape))}
    config["momentum"] = draw(st.sampled_from([0.0, 1.0, 0.99, 0.5]))
    config["epsilon"] = draw(st.sampled_from([1e-3, 1e-5, 0.5, 1e-12]))
    config["center"] = draw(st.booleans())
    config["scale"] = draw(st.booleans())
    if draw(st.booleans()):
        config["renorm"] = True
        config["renorm_momentum"] = draw(st.sampled_from([0.0, 1.0, 0.9]))
        clipping = {}
        for key, options in (("rmin", [0.5, 0.9]), ("rmax", [1.1, 3.0]), ("dmax", [0.0, 0.5, 5.0])):
            if draw(st.booleans()):
                clipping[key] = draw(st.sampled_from(options))
        config["renorm_clipping"] = clipping or None
    extra = draw(st.sampled_from(["none", "none", "ghost", "adjustment"]))
    if extra == "ghost" and shape:
        batch = shape[0]
        # At most 64 ghost batches: the reference loops over them in Python.
        divisors = [v for v in range(1, batch + 1) if batch % v == 0 and batch // v <= 64] or [1]
        config["virtual_batch_size"] = draw(st.sampled_from(divisors + [batch + 1, 2]))
    elif extra == "adjustment":
        config["adjustment"] = draw(st.integers(0, 2**31))  # seed; made a callable later
    config["trainable"] = draw(st.integers(0, 9)) > 0
    return config


def make_adjustment(seed: int) -> Any:
    def adjustment(shape: tuple[int, ...]) -> tuple[Any, Any]:
        # Scalars broadcast to any feature shape (both implementations take them).
        rng = np.random.default_rng(seed)
        return rng.uniform(0.5, 1.5), rng.normal(0.0, 0.5)

    return adjustment


@st.composite
def masks(draw: st.DrawFn, shape: tuple[int, ...]) -> Any:
    rank = len(shape)
    form = draw(st.sampled_from(["none", "keras", "full"]))
    if form == "none":
        return None
    dims = list(shape[:-1]) if form == "keras" else list(shape)
    dims = [1 if draw(st.integers(0, 3)) == 0 else n for n in dims]
    if draw(st.integers(0, 24)) == 0 and dims:
        dims[0] += 1  # does not fit the input
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    valid = rng.random(dims) < draw(st.sampled_from([0.3, 0.8, 1.0]))
    kind = draw(st.sampled_from(["bool", "bool", "uint8", "float32", "bad"]))
    if kind == "bool":
        return valid
    mask = valid.astype(np.float32 if kind == "float32" else np.int64)
    if kind == "bad" and mask.size:
        mask.flat[0] = 2  # neither a boolean nor 0/1
    assert mask.ndim in (rank - 1, rank)
    return mask


@st.composite
def cases(draw: st.DrawFn) -> Case:
    shape = draw(shapes())
    dtype = draw(st.sampled_from(FLOAT_DTYPES * 3 + OTHER_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    spread = draw(st.sampled_from([0.001, 0.1, 1.0, 10.0]))
    x, buffer = draw(views(lambda s: values(rng, s, dtype, spread, specials=True), shape))
    config = draw(configs(shape))
    policy = draw(st.sampled_from([None, None, None, "float64", "mixed_float16", "bfloat16"]))
    return Case(
        shape=shape,
        dtype=dtype,
        config=config,
        policy=policy,
        weights_seed=draw(st.integers(0, 2**31)),
        training=draw(st.booleans()),
        mask=draw(masks(shape)),
        x=x,
        buffers=[buffer],
    )


def reference_for(config: dict[str, Any]) -> ReferenceBN:
    kwargs = {k: v for k, v in config.items() if k not in ("adjustment",)}
    if "adjustment" in config:
        kwargs["adjustment"] = make_adjustment(config["adjustment"])
    return ReferenceBN(**kwargs)


def layer_for(config: dict[str, Any], policy: str | None) -> Any:
    kwargs = dict(config)
    if "adjustment" in config:
        kwargs["adjustment"] = make_adjustment(config["adjustment"])
    return batchnorm.BatchNormalization(dtype=policy, **kwargs)


def random_weights(names: list[str], shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    result = []
    for name in names:
        if name in ("moving_variance", "moving_stddev", "renorm_stddev"):
            result.append(rng.uniform(0.5, 2.0, shape))
        elif name == "gamma":
            result.append(rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape))
        else:
            result.append(rng.normal(0.0, 0.5, shape))
    return result


def snapshot(arrays: list[Any]) -> list[bytes]:
    return [np.ascontiguousarray(a).tobytes() for a in arrays]


def assert_close(
    actual: Any, expected: np.ndarray, tol: float, what: str, scale: Any = 0.0
) -> None:
    """Finite expected values within the tolerance; where a NaN or infinity reaches the expected
    value (its feature, its ghost batch), or the value is beyond the result dtype's range, any
    non-finite value. `scale` adds to |expected| the size of the terms a result is made of."""
    actual = np.asarray(actual)
    with np.errstate(over="ignore"):
        expected = np.where(np.isinf(expected.astype(actual.dtype)), np.inf, expected)
    actual = actual.astype(np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    with np.errstate(invalid="ignore"):
        error = np.abs(actual - expected)
    bound = tol * (1.0 + np.abs(expected) + scale)
    finite = np.isfinite(expected)
    bad = np.where(finite, ~(error <= bound), np.isfinite(actual))
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} values off; worst error "
        f"{np.nanmax(np.where(bad, error, 0.0))}, at expected "
        f"{expected[bad][:4]} got {actual[bad][:4]}"
    )


def dx_terms(reference: ReferenceBN, dy: np.ndarray) -> np.ndarray:
    """Per element, the largest |dy * gamma * k| / std of its feature and ghost batch: dx is a
    difference of such terms (cancelling where a batch is tiny or std ~ sqrt(epsilon)), so its
    rounding error is relative to them, not to dx."""
    cache = reference._cache
    dy = np.asarray(dy, np.float64)
    if cache["mode"] == "inference":
        return np.abs(dy * cache["gamma"] * cache["inv_std"])
    terms = np.zeros_like(dy)
    for group in cache["groups"]:
        idx = group["idx"]
        term = np.abs(dy[idx] * cache["gamma"] * cache["k"]) / group["s"]
        terms[idx] = np.nanmax(term, axis=reference.reduced_axes, keepdims=True, initial=0.0)
    return terms


def mean_abs(a: np.ndarray) -> float:
    finite = np.abs(a[np.isfinite(a)])
    return float(finite.mean()) if finite.size else 0.0


def kernel_dtype(dtype: str, policy: str | None) -> np.dtype:
    return np.dtype(data_dtype(policy_from(policy), np_dtype(dtype)))


@given(case=cases(), data=st.data())
def test_layer_matches_the_reference_or_refuses(case: Case, data: st.DataObject) -> None:
    note(f"shape={case.shape} dtype={case.dtype} strides={case.x.strides} policy={case.policy}")
    note(f"config={case.config} training={case.training}")
    note(f"mask={None if case.mask is None else (case.mask.shape, case.mask.dtype)}")
    inputs = [case.x, *case.buffers] + ([] if case.mask is None else [case.mask])
    inputs_before = snapshot(inputs)

    reference_error: Exception | None = None
    try:
        layer = layer_for(case.config, case.policy)
    except ERRORS as error:
        # The layer checks what it can before it sees a shape; the reference must agree that
        # the configuration is invalid (for this input at least).
        with pytest.raises(ERRORS):
            reference_for(case.config).build(case.shape)
        note(f"refused at construction: {error}")
        return
    reference = reference_for(case.config)
    compute = kernel_dtype(case.dtype, case.policy)
    x64 = np.asarray(case.x).astype(compute).astype(np.float64)
    try:
        reference.build(x64.shape)
    except ERRORS as error:
        reference_error = error
    if reference_error is None:
        layer.build(case.shape)
        weights = random_weights(
            layer.options.weight_names(), reference.weight_shape, case.weights_seed
        )
        layer.set_weights(weights)
        # The reference starts from the values the layer stores (rounded to its weight dtype).
        reference.set_weights(layer.get_weights())
        try:
            expected = reference.forward(x64, training=case.training, mask=case.mask)
        except ERRORS as error:
            reference_error = error
    before = snapshot(layer.get_weights())
    if reference_error is not None:
        with pytest.raises(ERRORS):
            layer(case.x, training=case.training, mask=case.mask)
        assert snapshot(layer.get_weights()) == before, "weights changed by a refused call"
        assert snapshot(inputs) == inputs_before, "a refused call wrote its input"
        return

    y = layer(case.x, training=case.training, mask=case.mask)
    tol = TOLERANCE[compute.name]
    assert np.asarray(y).dtype == compute
    assert_close(y, expected, tol, "y")
    weight_tol = TOLERANCE[np.dtype(layer.dtype).name]
    for name, got, want in zip(
        layer.options.weight_names(), layer.get_weights(), reference.get_weights()
    ):
        assert_close(got, want, weight_tol, name)

    if data.draw(st.booleans(), label="backward"):
        dy_dtype = data.draw(st.sampled_from(["float32", "float64", case.dtype]), label="dy")
        rng = np.random.default_rng(case.weights_seed + 1)
        dy = rng.normal(size=case.shape).astype(np_dtype(dy_dtype))
        if data.draw(st.booleans(), label="dy reversed"):
            dy = np.ascontiguousarray(dy[::-1])[::-1]  # a negative-stride dy
        dy_before = snapshot([dy])
        dx = layer.backward(dy)
        want_dx, want_dgamma, want_dbeta = reference.backward(dy.astype(compute))
        terms = dx_terms(reference, dy.astype(compute))
        assert snapshot([dy]) == dy_before, "backward wrote dy"
        assert np.asarray(dx).dtype == compute
        assert_close(np.asarray(dx), want_dx, tol, "dx", scale=terms)
        sums = np.abs(dy.astype(np.float64)).sum(axis=reference.reduced_axes)
        sums = sums[np.isfinite(sums)]
        sum_tol = weight_tol * (1.0 + float(sums.max(initial=0.0))) * 4.0
        for key, want in (("gamma", want_dgamma), ("beta", want_dbeta)):
            if want is None:
                assert key not in layer.gradients
            else:
                got = np.asarray(layer.gradients[key]).reshape(want.shape)
                assert_close(got, want, sum_tol, f"d{key}")
    assert snapshot(inputs) == inputs_before, "the layer wrote its input or mask"

    # Inputs the built layer cannot take are refused with nothing changed: other feature sizes,
    # another rank, and a dy that does not match the call's input.
    before = snapshot(layer.get_weights())
    wrong = list(case.shape)
    wrong[reference.axes[0]] += 1
    for bad in (np.ones(wrong, np.float32), np.ones((*case.shape, 1), np.float32)):
        with pytest.raises(ValueError):
            layer(bad, training=case.training)
    with pytest.raises(ValueError):
        layer.backward(np.ones(wrong, np.float32))
    assert snapshot(layer.get_weights()) == before, "a refused call changed the weights"


@given(case=cases(), data=st.data())
def test_functional_contexts_differentiate_their_own_call(case: Case, data: st.DataObject) -> None:
    """The stateless API with one set of weights used twice: each call's context gives the
    gradient of its own call (backward taken in the reverse order), and the moving statistics
    see both updates, as the reference computes them call by call."""
    config = {k: v for k, v in case.config.items() if k not in ("adjustment", "trainable")}
    try:
        options = F.Options(**config)
        reference = ReferenceBN(**config)
        reference.build(case.shape)
    except ERRORS:
        assume(False)
    compute = kernel_dtype(case.dtype, None)
    x1 = np.asarray(case.x).astype(compute)
    x2 = (x1.astype(np.float64) * 0.5 - 1.0).astype(compute)
    weight_dtype = "float64" if compute == np.float64 else "float32"
    weights = F.initial_weights(options, case.shape, dtype=weight_dtype)
    values = random_weights(list(weights), reference.weight_shape, case.weights_seed)
    for name, value in zip(list(weights), values):
        weights[name][...] = value.reshape(-1)
    reference.set_weights([weights[name] for name in options.weight_names()])
    rng = np.random.default_rng(case.weights_seed + 2)
    dy = rng.normal(size=case.shape).astype(compute)
    expected = []
    try:
        for x in (x1, x2):
            want_y = reference.forward(x.astype(np.float64), training=True, mask=case.mask)
            want = reference.backward(dy.astype(np.float64))
            expected.append((want_y, *want, dx_terms(reference, dy)))
    except ERRORS:
        # An invalid mask (or ghost batch size) for this input: refused, weights unchanged.
        before = snapshot(list(weights.values()))
        with pytest.raises(ERRORS):
            F.forward(x1, weights, options, training=True, mask=case.mask)
        assert snapshot(list(weights.values())) == before
        return
    calls = [F.forward(x, weights, options, training=True, mask=case.mask) for x in (x1, x2)]
    tol = TOLERANCE[compute.name]
    weight_tol = TOLERANCE[weight_dtype]
    for name, want in zip(options.weight_names(), reference.get_weights()):
        assert_close(weights[name], want.reshape(-1), weight_tol, name)
    order = [1, 0] if data.draw(st.booleans(), label="reverse") else [0, 1]
    for i in order:
        y, context = calls[i]
        want_y, want_dx, want_dgamma, want_dbeta, terms = expected[i]
        assert_close(y, want_y, tol, f"y of call {i}")
        dx, dgamma, dbeta = F.backward(dy, context)
        assert_close(dx, want_dx, tol, f"dx of call {i}", scale=terms)
        sums = np.abs(dy.astype(np.float64)).sum(axis=reference.reduced_axes)
        sums = sums[np.isfinite(sums)]
        sum_tol = weight_tol * (1.0 + float(sums.max(initial=0.0))) * 4.0
        for got, want, key in ((dgamma, want_dgamma, "gamma"), (dbeta, want_dbeta, "beta")):
            if want is None:
                assert got is None, key
            else:
                assert_close(np.asarray(got), want.reshape(-1), sum_tol, f"d{key} of call {i}")


@dataclass
class OutCase:
    x: np.ndarray
    out: Any
    expect_error: bool
    training: bool

    def __repr__(self) -> str:
        return (
            f"OutCase(x={self.x.shape} {self.x.dtype} {self.x.strides}, out={self.out.shape} "
            f"{self.out.dtype} {self.out.strides}, expect_error={self.expect_error}, "
            f"training={self.training})"
        )


@st.composite
def out_cases(draw: st.DrawFn) -> OutCase:
    shape = draw(shapes(max_rank=4))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x, _ = draw(views(lambda s: values(rng, s, dtype, 1.0, specials=False), shape))
    kind = draw(
        st.sampled_from(
            ["fresh", "strided", "negative", "alias", "overlap", "readonly", "dtype", "shape"]
        )
    )
    size = math.prod(shape)
    dt = kernel_dtype(dtype, None)  # results come in the compute dtype (float64 data: float32)
    expect_error = True
    if kind == "fresh":
        out, expect_error = np.empty(shape, dt), False
    elif kind == "strided":
        out, expect_error = (
            np.empty(tuple(2 * n for n in shape), dt)[(slice(None, None, 2),) * len(shape)],
            False,
        )
    elif kind == "negative":
        out, expect_error = np.empty(shape, dt)[(slice(None, None, -1),) * len(shape)], False
    elif kind == "alias":
        out = x
        # An empty x shares no memory with itself, but a read-only x is never a valid out.
        expect_error = size > 0 or not x.flags.writeable or x.dtype != dt
    elif kind == "overlap":
        # Another view of the memory x reads (an empty x reads none).
        base = np.empty(size + 1, x.dtype)
        base[1:] = np.asarray(x).reshape(-1)
        x = base[1:].reshape(shape)
        out = base[:-1].reshape(shape)
        expect_error = size > 1 or x.dtype != dt  # one element each: neighbours, no overlap
    elif kind == "readonly":
        out = np.empty(shape, dt)
        out.flags.writeable = False
    elif kind == "dtype":
        other = draw(st.sampled_from([d for d in FLOAT_DTYPES + ["int32"] if np_dtype(d) != dt]))
        out = np.empty(shape, np_dtype(other))
    else:
        out = np.empty(shape + (1,), dt)
    return OutCase(x=x, out=out, expect_error=expect_error, training=draw(st.booleans()))


@given(case=out_cases(), axis=st.sampled_from([-1, 0]))
def test_out_is_filled_or_refused(case: OutCase, axis: int) -> None:
    """`out=` in forward and backward: any writable layout of the input's shape and dtype gets the
    result; aliasing, overlapping, read-only, wrong dtype or shape raise with nothing changed."""
    note(f"x {case.x.shape} {case.x.dtype} {case.x.strides}; out {case.out.shape} {case.out.dtype}")
    x_before = snapshot([case.x])
    layer = batchnorm.BatchNormalization(axis=axis, momentum=0.5)
    layer.build(case.x.shape)
    reference = ReferenceBN(axis=axis, momentum=0.5)
    reference.build(case.x.shape)
    weights = layer.get_weights()
    kernel = kernel_dtype(case.x.dtype.name if case.x.dtype.kind != "V" else "bfloat16", None)
    if case.expect_error:
        out_before = snapshot([case.out])
        with pytest.raises(ERRORS):
            layer(case.x, training=case.training, out=case.out)
        assert snapshot(layer.get_weights()) == snapshot(weights)
        if case.out is not case.x:
            assert snapshot([case.out]) == out_before
        assert snapshot([case.x]) == x_before
        return
    result = layer(case.x, training=case.training, out=case.out)
    assert result is case.out
    expected = reference.forward(np.asarray(case.x, np.float64), training=case.training)
    tol = TOLERANCE[kernel.name]
    assert_close(case.out, expected, tol, "y")
    assert snapshot([case.x]) == x_before
    dy = np.ones(case.x.shape, kernel)
    dx_out = np.full_like(case.out, 7)
    dx = layer.backward(dy, out=dx_out)
    assert dx is dx_out
    want_dx = reference.backward(dy.astype(np.float64))[0]
    assert_close(dx_out, want_dx, tol * (1.0 + mean_abs(want_dx)), "dx")
    if dy.size:
        with pytest.raises(ValueError, match="overlap"):  # the result aliasing dy
            layer.backward(dy, out=dy)
