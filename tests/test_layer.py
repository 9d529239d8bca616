"""The compiled layer against the float64 NumPy reference (tests/reference.py) over layouts, axis
sets, masks, ghost batches, renorm, adjustment, center/scale, modes, odd sizes and strided
views; plus finite-difference gradients of the layer itself in float64."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

import batchnorm

from reference import ReferenceBN

RTOL = {np.float32: 2e-5, np.float64: 1e-11}


def random_state(layer: Any, rng: np.random.Generator) -> list[np.ndarray]:
    weights = []
    for w in layer.weights:
        shape = w.shape
        if w.name == "gamma":
            weights.append(rng.uniform(0.5, 1.5, shape))
        elif w.name in ("beta", "moving_mean", "renorm_mean"):
            weights.append(rng.normal(0.0, 0.5, shape))
        else:  # variances and standard deviations
            weights.append(rng.uniform(0.5, 2.0, shape))
    return weights


def close(got: Any, ref: Any, dtype: Any, what: str, scale: float | None = None) -> None:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    rtol = RTOL[dtype]
    magnitude = scale if scale is not None else (np.abs(ref).max() if ref.size else 0.0)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(magnitude, 1e-30), err_msg=what)


def run_case(
    shape: tuple[int, ...],
    dtype: Any,
    steps: list[bool],
    mask_fn: Any = None,
    view: Any = None,
    **config: Any,
) -> None:
    rng = np.random.default_rng(abs(hash((shape, str(config)))) % 2**32)
    layer = batchnorm.BatchNormalization(
        dtype="float64" if dtype is np.float64 else "float32", **config
    )
    ref = ReferenceBN(**config)
    viewed_shape = view(np.empty(shape)).shape if view else shape
    layer.build(viewed_shape)
    ref.build(viewed_shape)
    weights = random_state(layer, rng)
    layer.set_weights(weights)
    ref.set_weights(weights)
    ref.set_weights(layer.get_weights())  # the layer's rounded values
    for step, training in enumerate(steps):
        base = rng.normal(size=shape) * rng.uniform(0.5, 3.0) + rng.uniform(-3, 3)
        x = view(base.astype(dtype)) if view else base.astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        mask = mask_fn(rng) if (mask_fn and training) else None
        y = layer(x, training=training, mask=mask)
        y_ref = ref.forward(np.asarray(x, np.float64), training=training, mask=mask)
        what = f"step {step} training={training}"
        close(y, y_ref, dtype, f"{what}: y")
        dx = layer.backward(dy)
        dx_ref, dgamma_ref, dbeta_ref = ref.backward(np.asarray(dy, np.float64))
        close(dx, dx_ref, dtype, f"{what}: dx")
        if dgamma_ref is not None:
            close(layer.gradients["gamma"], dgamma_ref, dtype, f"{what}: dgamma")
        if dbeta_ref is not None:
            close(layer.gradients["beta"], dbeta_ref, dtype, f"{what}: dbeta")
        for got, want, w in zip(layer.get_weights(), ref.get_weights(), layer.weights):
            close(got, want, dtype, f"{what}: {w.name}")


LAYOUTS = [
    ((16, 5), -1),
    ((4, 3, 5, 6), -1),  # NHWC
    ((4, 6, 5, 3), 1),  # NCHW
    ((3, 7, 4), -1),  # (B, T, C)
    ((3, 4, 7), 1),  # (B, C, T)
    ((2, 3, 4, 3, 5), 1),  # NCDHW
    ((2, 3, 4, 3, 5), -1),  # NDHWC
    ((4, 3, 5, 6), [1, 3]),
    ((4, 3, 5, 6), [-1, -2]),
    ((3, 4, 5), [0, 2]),
    ((7, 5, 3, 11), -1),  # primes
    ((1, 3, 4, 5), 1),  # batch of one
    ((1, 1, 1, 6), -1),  # N*H*W = 1
    ((9, 1), -1),  # one feature
    ((2, 17, 3), 1),  # non-multiples of any vector width
    ((37, 19), 0),  # features on the first axis
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=[f"{s}-{a}" for s, a in LAYOUTS])
def test_layouts(shape: tuple[int, ...], axis: Any, dtype: Any) -> None:
    run_case(shape, dtype, [True, True, False], axis=axis, momentum=0.8)


@pytest.mark.parametrize(
    "center,scale", list(itertools.product([True, False], repeat=2)), ids=lambda v: str(v)
)
def test_center_scale(center: bool, scale: bool) -> None:
    run_case((6, 4, 5), np.float64, [True, False], axis=1, center=center, scale=scale)


def test_frozen_layer_runs_inference() -> None:
    run_case((6, 5, 4), np.float64, [True, True], axis=-1, trainable=False)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a.transpose(0, 2, 3, 1),  # NCHW memory seen as NHWC
        lambda a: a[:, ::2],  # strided batch slice
        lambda a: a[..., 1:],  # offset inner slice
        lambda a: a[::-1],  # negative stride
    ],
    ids=["transposed", "step2", "offset", "reversed"],
)
@pytest.mark.parametrize("axis", [-1, 1])
def test_strided_views_are_read_in_place(view: Any, axis: int) -> None:
    run_case((4, 6, 5, 7), np.float32, [True, False], view=view, axis=axis)


WIDE_ROWS = [((40, 1100), np.float32), ((9, 4099), np.float32), ((12, 600), np.float64)]


@pytest.mark.parametrize(
    "shape,dtype", WIDE_ROWS, ids=[f"{r}x{f}-{d.__name__}" for (r, f), d in WIDE_ROWS]
)
def test_wide_rows(shape: tuple[int, int], dtype: Any) -> None:
    # Rows whose coefficients outgrow the L1 cache are normalized a tile of columns at a time over
    # blocks of rows: tiles that end mid row and row counts that leave part of a block.
    run_case(shape, dtype, [True, False], axis=-1, momentum=0.8)


def test_wide_rows_streamed() -> None:
    # 17 MB of output: streaming stores, each tile its own span.
    run_case((1040, 4100), np.float32, [False], axis=-1)


# Rows of up to 8 features lying back to back are reduced several to a block of 16 lanes, rows of
# other widths that leave a tail block (9, 12, 24, 33, 40) as groups of rows that fill whole
# blocks (65: a group would be too wide); row counts that leave part of a block or group, several
# chunks, ghost batches and views whose rows are not back to back (the row-by-row loops) must all
# give the reference's statistics and sums.
FEW_FEATURE_ROWS = [
    (rows, features)
    for rows in (6, 19, 20003)
    for features in (1, 3, 5, 7, 8, 9, 12, 24, 33, 40, 65)
]


@pytest.mark.parametrize("shape", FEW_FEATURE_ROWS, ids=[f"{r}x{f}" for r, f in FEW_FEATURE_ROWS])
def test_rows_of_a_few_features(shape: tuple[int, int]) -> None:
    run_case(shape, np.float32, [True, True, False], axis=-1, momentum=0.8)


@pytest.mark.parametrize(
    "shape,config,view",
    [
        ((32, 20, 20, 3), {"virtual_batch_size": 8}, None),
        ((2, 3, 50, 7, 6), {"axis": [-2, -1]}, None),  # rows of 42 features, in groups of 8
        ((8, 3, 30, 30), {}, lambda a: a.transpose(0, 2, 3, 1)),  # features 900 elements apart
        ((64, 30, 4), {}, lambda a: a[:, ::2]),  # rows 8 elements apart
        ((64, 30, 5), {}, lambda a: a[::-1, ::-1]),  # rows walked backwards
    ],
    ids=["ghost", "two-axes", "transposed", "every-other-row", "reversed"],
)
def test_rows_of_a_few_features_in_other_arrangements(shape, config, view) -> None:
    run_case(shape, np.float32, [True, False], view=view, **{"axis": -1, **config})


MASKED_FEW_FEATURE_ROWS = [
    ((6, 3), None),
    ((19, 5), None),
    ((20003, 3), None),
    ((20003, 8), None),
    ((32, 20, 20, 7), 4),
    ((6, 12), None),
    ((19, 24), None),
    ((20003, 9), None),
    ((20003, 24), None),
    ((5003, 40), None),
    ((3001, 63), None),
    ((32, 20, 20, 12), 4),
    ((1003, 100), None),
    ((7, 63), None),
    ((10, 9), None),
    ((40001, 1), None),
    ((20003, 16), None),
]


@pytest.mark.parametrize(
    "shape,vbs",
    MASKED_FEW_FEATURE_ROWS,
    ids=["x".join(map(str, s)) + ("-ghost" if v else "") for s, v in MASKED_FEW_FEATURE_ROWS],
)
def test_masked_rows_of_a_few_features(shape: tuple[int, ...], vbs: int | None) -> None:
    # Masked rows of up to 8 features are packed, wider rows that leave a tail block are grouped
    # (63: groups of 16 rows; (7, 63) and (10, 9): fewer rows than a group): each block's lanes
    # take their row's mask.
    run_case(
        shape,
        np.float32,
        [True, True, False],
        mask_fn=lambda r: r.random(shape[:-1]) > 0.3,
        axis=-1,
        virtual_batch_size=vbs,
    )


def _padding_mask(shape: tuple[int, ...]) -> Any:
    # Sequences of random lengths (Keras' padding mask): long stretches of valid rows, then
    # masked-out ones, so the dx pass meets stretches long enough to stream.
    def make(rng: Any) -> Any:
        lengths = rng.integers(0, shape[1] + 1, size=shape[0])
        return np.arange(shape[1])[None, :] < lengths[:, None]

    return make


@pytest.mark.parametrize("shape", [(16, 700, 3), (8, 300, 24), (4, 1000, 64)], ids=str)
def test_masked_backward_with_padding_masks(shape: tuple[int, ...]) -> None:
    # The dx pass takes each stretch of rows of one kind (valid or masked out) as one span.
    run_case(shape, np.float32, [True, False], mask_fn=_padding_mask(shape), axis=-1)


@pytest.mark.parametrize(
    "shape,dtype",
    [((1400003, 3), np.float32), ((20003, 5), np.float64), ((3001, 11), np.float64)],
    ids=["streamed", "float64", "float64-11"],
)
def test_masked_backward_of_rows_of_a_few_features(shape: tuple[int, ...], dtype: Any) -> None:
    # Under a random row mask, the dx pass of rows of up to 16 features takes a run as one span
    # whose blocks of lanes take their rows' mask bytes. 16.8 MB of dx is written with streaming
    # stores: chunks start at various offsets within a cache line, so a span may begin with a
    # short head block, after which its whole blocks start at another feature than the first.
    run_case(shape, dtype, [True], mask_fn=lambda r: r.random(shape[:-1]) > 0.3, axis=-1)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("shape", [(20003, 3), (4097, 7), (5, 41, 16)], ids=str)
def test_masked_rows_of_a_few_features_in_16_bits(policy: str, shape: tuple[int, ...]) -> None:
    # 16-bit data take the masked paths (their loads and the head and tail of a span) with the
    # same float32 arithmetic as their values in float32: each output is that result rounded once.
    import ml_dtypes

    half = np.dtype(np.float16 if policy == "mixed_float16" else ml_dtypes.bfloat16)
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    x = (rng.normal(size=shape) * 3.0 + 1.0).astype(half)
    dy = rng.normal(size=shape).astype(half)
    mask = rng.random(shape[:-1]) > 0.3
    mixed = batchnorm.BatchNormalization(dtype=policy)
    full = batchnorm.BatchNormalization()
    pairs = [
        ("y", mixed(x, training=True, mask=mask), full(x.astype(np.float32), True, mask)),
        ("dx", mixed.backward(dy), full.backward(dy.astype(np.float32))),
    ]
    for name, got, want in pairs:
        assert got.dtype == half, name
        np.testing.assert_array_equal(
            got.view(np.uint16), want.astype(half).view(np.uint16), err_msg=name
        )


def _rows_apart(a: Any) -> Any:
    return a[:, ::2]  # every other row: rows two rows' width apart


def test_masked_backward_of_rows_that_are_not_back_to_back() -> None:
    # The mask's bytes lie back to back but the data's rows do not: each run is a single row.
    shape = (64, 100, 5)
    run_case(
        shape,
        np.float32,
        [True, False],
        mask_fn=lambda r: r.random((64, 50)) > 0.3,
        view=_rows_apart,
        axis=-1,
    )


@pytest.mark.parametrize("features", [3, 24])
def test_masked_backward_with_a_strided_mask(features: int) -> None:
    # A mask whose bytes are not back to back (every other column of a wider array) may reach the
    # dx pass row by row; its results must still match the float64 reference.
    shape = (64, 50, features)

    def strided_mask(rng: Any) -> Any:
        return (rng.random((shape[0], 2 * shape[1])) > 0.3)[:, ::2]

    run_case(shape, np.float32, [True, False], mask_fn=strided_mask, axis=-1)


@pytest.mark.parametrize("features", [3, 24, 33])
def test_masked_rows_of_a_few_features_ignore_masked_out_values(features: int) -> None:
    # NaN and infinity in masked-out rows, and a first chunk with no valid row at all, leave the
    # statistics those of the valid rows (3 features packed, 24 and 33 grouped).
    rng = np.random.default_rng(11)
    rows = 40000 * 3 // features + 1
    x = rng.normal(size=(rows, features)).astype(np.float32)
    valid = rng.random(rows) > 0.4
    valid[: rows * 9 // 40] = False  # more than the first chunk (about 16384 elements)
    x[~valid] = np.nan
    x[np.flatnonzero(~valid)[::7]] = np.inf
    layer = batchnorm.BatchNormalization(momentum=0.0)
    layer(x, training=True, mask=valid)
    kept = x[valid].astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean.numpy(), kept.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), kept.var(axis=0), rtol=1e-5)


@pytest.mark.parametrize(
    "features,row", [(3, 2000), (7, 2000), (7, 2001), (5, 3), (12, 2001), (24, 4095)]
)
def test_nan_in_rows_of_a_few_features_stays_in_its_feature(features: int, row: int) -> None:
    # The NaN is the first element of a packed block's row or falls in the lanes past its last
    # whole row (3 features: lane 15 holds the next block's first element); with 12 and 24
    # features it is in a group of rows, or (row 4095 of 4096) one of the rows left after them.
    rng = np.random.default_rng(features)
    x = rng.normal(size=(4096, features)).astype(np.float32)
    x[row, 0] = np.nan
    layer = batchnorm.BatchNormalization()
    y = layer(x, training=True)
    layer.backward(rng.normal(size=x.shape).astype(np.float32))
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()
    mean, dgamma = layer.moving_mean.numpy(), np.asarray(layer.gradients["gamma"])
    assert np.isnan(mean[0]) and np.isfinite(mean[1:]).all()
    assert np.isnan(dgamma[0]) and np.isfinite(dgamma[1:]).all()


@pytest.mark.parametrize("shape,axis", [((6, 5, 4), -1), ((6, 4, 5), 1)], ids=["btc", "bct"])
def test_masks(shape: tuple[int, ...], axis: int) -> None:
    # Keras' form: the leading axes, broadcast along the last. With axis=1 on (B, C, T) that
    # is a (B, C) mask: each feature counts its own (sample, channel) rows.
    run_case(
        shape,
        np.float64,
        [True, True, False],
        mask_fn=lambda r: r.random(shape[:-1]) > 0.3,
        axis=axis,
    )


@pytest.mark.parametrize(
    "shape,axis,mask_shape,vbs",
    [
        ((6, 3, 4, 5), 1, (6, 1, 4, 5), None),  # per-pixel NCHW mask
        ((6, 3, 4, 5), 1, (6, 3, 4, 5), 2),  # every position on its own, ghost batches
        ((6, 4, 5, 3), -1, (6, 4, 5, 3), None),  # channels-last, varying along the features
        ((6, 4, 5, 3), [1, 3], (6, 4, 5, 1), None),  # axis list, mask along a feature axis
        ((6, 4, 3), 1, (6, 4), 3),  # Keras' form on (B, C, T) with ghost batches
        # float32 sizes large enough for the vector, fused-plane and blocked kernels:
        ((16, 64, 14, 14), 1, (16, 64, 14), None),  # Keras' form on NCHW: (B, C, H)
        ((8, 40, 33, 33), 1, (8, 40, 33), 4),  # long planes, ghost batches
        ((16, 7, 7, 64), -1, (16, 7, 7, 64), None),  # channels-last, per position
        ((512, 96), -1, (512, 96), None),  # dense rows, per position
    ],
)
def test_masks_varying_along_features(
    shape: tuple[int, ...], axis: Any, mask_shape: tuple[int, ...], vbs: int | None
) -> None:
    run_case(
        shape,
        np.float64 if math.prod(shape) < 10_000 else np.float32,
        [True, True, False],
        mask_fn=lambda r: r.random(mask_shape) > 0.4,
        axis=axis,
        virtual_batch_size=vbs,
    )


def test_mask_broadcast_and_integer_values() -> None:
    run_case(
        (6, 4, 5),
        np.float32,
        [True],
        mask_fn=lambda r: (r.random((6, 1)) > 0.3).astype(int),
        axis=1,
    )


@pytest.mark.parametrize("shape,axis", [((12, 5), -1), ((6, 3, 4, 5), -1), ((6, 5, 3, 4), 1)])
def test_ghost_batches(shape: tuple[int, ...], axis: int) -> None:
    run_case(shape, np.float64, [True, True, False], axis=axis, virtual_batch_size=3)


def test_ghost_batches_with_masks_and_renorm() -> None:
    run_case(
        (8, 5, 3),
        np.float64,
        [True, True],
        axis=-1,
        virtual_batch_size=2,
        renorm=True,
        mask_fn=lambda r: r.random((8, 5)) > 0.4,
        renorm_clipping={"rmax": 1.2, "dmax": 0.2},
    )


@pytest.mark.parametrize(
    "clipping",
    [None, {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}, {"rmin": 0.95}],
    ids=["free", "all", "rmin"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_renorm(clipping: Any, dtype: Any) -> None:
    run_case(
        (10, 3, 4),
        dtype,
        [True, True, True, False],
        axis=1,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=0.7,
        momentum=0.9,
    )


@pytest.mark.parametrize("renorm", [False, True])
def test_adjustment(renorm: bool) -> None:
    scale, bias = np.array([0.9, 1.1, 1.3]), np.array([0.1, -0.2, 0.05])
    run_case(
        (6, 4, 3),
        np.float64,
        [True, True],
        axis=-1,
        renorm=renorm,
        adjustment=lambda shape: (scale, bias),
    )


def test_zero_size_batch_keeps_moving_statistics() -> None:
    layer = batchnorm.BatchNormalization()
    layer.build((None, 4))
    before = layer.get_weights()
    y = layer(np.zeros((0, 4), np.float32), training=True)
    assert y.shape == (0, 4)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_all_masked_feature_keeps_moving_statistics() -> None:
    layer = batchnorm.BatchNormalization(axis=1, dtype="float64")
    x = np.random.default_rng(3).normal(size=(4, 2, 5))
    mask = np.zeros((4, 2), bool)  # Keras' form for axis=1 on (B, C, T): (B, C)
    layer.build(x.shape)
    before = layer.get_weights()
    y = layer(x, training=True, mask=mask)
    gamma, beta = before[0], before[1]
    np.testing.assert_allclose(y, x / np.sqrt(1e-3) * gamma[None, :, None] + beta[None, :, None])
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_nan_stays_in_its_feature() -> None:
    x = np.random.default_rng(4).normal(size=(8, 3)).astype(np.float32)
    x[2, 1] = np.nan
    layer = batchnorm.BatchNormalization()
    y = layer(x, training=True)
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()
    mm = layer.moving_mean.numpy()
    assert np.isnan(mm[1]) and np.isfinite(mm[[0, 2]]).all()


@pytest.mark.parametrize(
    "shape,axis,training,kw",
    [
        ((5, 3, 4), 1, True, {}),
        ((5, 4, 3), -1, False, {}),
        ((6, 3, 4), [0, 2], True, {}),
        ((6, 4, 3), -1, True, {"virtual_batch_size": 2}),
        ((6, 3, 4), 1, True, {"mask": True}),
    ],
)
def test_finite_difference_gradients(
    shape: tuple[int, ...], axis: Any, training: bool, kw: dict[str, Any]
) -> None:
    rng = np.random.default_rng(7)
    use_mask = kw.pop("mask", False)
    layer = batchnorm.BatchNormalization(axis=axis, dtype="float64", momentum=0.5, **kw)
    layer.build(shape)
    layer.set_weights(random_state(layer, rng))
    state = layer.get_weights()
    x = rng.normal(size=shape) * 2 + 1
    dy = rng.normal(size=shape)
    mask = rng.random(shape[:-1]) > 0.3 if use_mask else None  # (B, C) for axis=1: per feature

    def loss(
        x_: np.ndarray, gamma: np.ndarray | None = None, beta: np.ndarray | None = None
    ) -> float:
        weights = list(state)
        if gamma is not None:
            weights[0] = gamma
        if beta is not None:
            weights[1] = beta
        layer.set_weights(weights)
        return float(np.sum(layer(x_, training=training, mask=mask) * dy))

    loss(x)
    dx = layer.backward(dy)
    grads = dict(layer.gradients)
    h = 1e-6

    def numeric(f: Any, a: np.ndarray) -> np.ndarray:
        g = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            p, m = a.copy(), a.copy()
            p[i] += h
            m[i] -= h
            g[i] = (f(p) - f(m)) / (2 * h)
        return g

    np.testing.assert_allclose(dx, numeric(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        grads["gamma"], numeric(lambda g: loss(x, gamma=g), state[0]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        grads["beta"], numeric(lambda b: loss(x, beta=b), state[1]), rtol=1e-5, atol=1e-7
    )


def test_input_is_read_in_place_and_out_is_used() -> None:
    x = np.random.default_rng(0).normal(size=(8, 4, 5)).astype(np.float32)
    x.flags.writeable = False  # read-only inputs are accepted and never written
    out = np.empty_like(x)
    layer = batchnorm.BatchNormalization(axis=1)
    y = layer(x, training=True, out=out)
    assert y is out
    dx_out = np.empty_like(x)
    assert layer.backward(np.ones_like(x), out=dx_out) is dx_out


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "make_out",
    [
        np.empty_like,  # the plain call writes it as it is
        lambda x: np.empty((x.shape[0], x.shape[1] * 2), x.dtype)[:, ::2],  # strided
        lambda x: np.empty_like(x, order="F"),
    ],
)
def test_out_gives_bitwise_the_default_call(training: bool, make_out: Any) -> None:
    x = np.random.default_rng(3).normal(size=(16, 12)).astype(np.float32)
    by_default, into_out = batchnorm.BatchNormalization(), batchnorm.BatchNormalization()
    for step in range(2):  # a second step reads the moving statistics the first one wrote
        expected = by_default(x, training=training)
        out = make_out(x)
        assert into_out(x, training=training, out=out) is out
        assert out.tobytes() == np.ascontiguousarray(expected).tobytes(), step
    for a, b in zip(by_default.get_weights(), into_out.get_weights(), strict=True):
        assert a.tobytes() == b.tobytes()
    dy = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    expected_dx = by_default.backward(dy)
    out = make_out(x)
    assert into_out.backward(dy, out=out) is out
    assert out.tobytes() == np.ascontiguousarray(expected_dx).tobytes()
    for name, gradient in by_default.gradients.items():
        assert into_out.gradients[name].tobytes() == gradient.tobytes(), name


def test_out_that_cannot_take_the_result_is_refused_and_nothing_changes() -> None:
    x = np.random.default_rng(5).normal(size=(8, 6)).astype(np.float32)
    layer = batchnorm.BatchNormalization()
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    read_only = np.empty_like(x)
    read_only.flags.writeable = False
    for out, error in [
        (x, "overlap"),
        (read_only, "read-only"),
        (np.empty((8, 5), np.float32), "expected shape"),
        (np.empty_like(x, dtype=np.float64), "expected shape"),
    ]:
        with pytest.raises(ValueError, match=error):
            layer(x, training=True, out=out)
    for a, b in zip(before, layer.get_weights(), strict=True):
        assert a.tobytes() == b.tobytes()
    # The same for the backward's out: dy's memory, x's, read-only, wrong shape.
    dy = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
    for out, error in [
        (dy, "overlap"),
        (x, "overlap"),
        (read_only, "read-only"),
        (np.empty((8, 5), np.float32), "expected shape"),
    ]:
        kept = out.copy()
        with pytest.raises(ValueError, match=error):
            layer.backward(dy, out=out)
        assert out.tobytes() == kept.tobytes()


def test_integer_inputs_are_converted() -> None:
    x = np.arange(24).reshape(6, 4)
    y = batchnorm.BatchNormalization()(x, training=True)
    assert y.dtype == np.float32
    ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    np.testing.assert_allclose(y, ref, rtol=1e-5)


def test_sgd_step_with_regularizers_and_constraints() -> None:
    layer = batchnorm.BatchNormalization(
        gamma_regularizer="l2", beta_regularizer="l1", beta_constraint="non_neg", dtype="float64"
    )
    x = np.random.default_rng(1).normal(size=(10, 3))
    layer(x, training=True)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    assert layer.losses == pytest.approx([0.01 * np.sum(gamma**2), 0.01 * np.sum(np.abs(beta))])
    dy = np.random.default_rng(2).normal(size=x.shape)
    layer.backward(dy)
    g = layer.gradients
    layer.apply_gradients(0.5)
    np.testing.assert_allclose(layer.gamma.numpy(), gamma - 0.5 * (g["gamma"] + 0.02 * gamma))
    expected_beta = np.maximum(beta - 0.5 * (g["beta"] + 0.01 * np.sign(beta)), 0.0)
    np.testing.assert_allclose(layer.beta.numpy(), expected_beta)
