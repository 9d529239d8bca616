"""Tests that make the float64 reference (tests/reference.py) trustworthy as an oracle.

Gradients are checked against central finite differences, moving updates and ghost grouping
against hand computations; the initializers/regularizers/constraints modules are checked
against Keras' values, identifiers and config forms.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from reference import ReferenceBN


def _load_modules() -> tuple[Any, Any, Any]:
    try:
        from batchnorm import constraints, initializers, regularizers

        return initializers, regularizers, constraints
    except ImportError:
        pass
    # The package __init__ needs the compiled extension; these modules do not. Load them from
    # the source tree under a private package name so no half-built `batchnorm` is left in
    # sys.modules for other tests.
    name = "_batchnorm_pure_src"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "python" / "batchnorm")]
        sys.modules[name] = pkg
    return tuple(
        importlib.import_module(f"{name}.{m}")
        for m in ("initializers", "regularizers", "constraints")
    )


initializers, regularizers, constraints = _load_modules()

EPS = 1e-3


# ============================================================================ helpers
def make_layer(
    x_shape: tuple[int, ...],
    weights: list[np.ndarray] | None = None,
    cls: type = ReferenceBN,
    **kw: Any,
) -> ReferenceBN:
    layer = cls(**kw)
    layer.build(x_shape)
    if weights is not None:
        layer.set_weights(weights)
    return layer


def random_weights(layer: ReferenceBN, rng: np.random.Generator) -> list[np.ndarray]:
    """Non-trivial weights of the right shapes (positive where a stddev/variance is needed)."""
    out = []
    for name, w in zip(layer._weight_names(), layer.get_weights()):
        if name in ("moving_variance", "moving_stddev", "renorm_stddev"):
            out.append(rng.uniform(0.5, 2.0, w.shape))
        elif name == "gamma":
            out.append(rng.uniform(0.5, 1.5, w.shape) * rng.choice([-1, 1], w.shape))
        else:
            out.append(rng.normal(0.0, 0.5, w.shape))
    return out


def numeric_grad(f: Callable[[np.ndarray], float], a: np.ndarray, h: float = 1e-5) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f(a.copy())
        a[i] = old - h
        down = f(a.copy())
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def check_gradients(
    x: np.ndarray,
    training: bool,
    mask: Any = None,
    seed: int = 0,
    weights: list[np.ndarray] | None = None,
    cls: type = ReferenceBN,
    **kw: Any,
) -> None:
    """backward() against central differences of L = Σ dy·y w.r.t. x, gamma and beta."""
    rng = np.random.default_rng(seed)
    probe = make_layer(x.shape, cls=cls, **kw)
    ws = weights if weights is not None else random_weights(probe, rng)
    names = probe._weight_names()
    layer = make_layer(x.shape, ws, cls=cls, **kw)
    y = layer.forward(x, training=training, mask=mask)
    dy = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = layer.backward(dy)

    def loss(x_: np.ndarray, replace: dict[str, np.ndarray] | None = None) -> float:
        w2 = [replace.get(n, w) if replace else w for n, w in zip(names, ws)]
        fresh = make_layer(x.shape, w2, cls=cls, **kw)  # fresh: moving updates cannot leak
        return float(np.sum(dy * fresh.forward(x_, training=training, mask=mask)))

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-6)
    for name, analytic in (("gamma", dgamma), ("beta", dbeta)):
        if name not in names:
            assert analytic is None
            continue
        w0 = ws[names.index(name)]
        num = numeric_grad(lambda w, n=name: loss(x, {n: w}), w0)
        assert analytic.shape == w0.shape
        np.testing.assert_allclose(analytic, num, rtol=1e-5, atol=1e-6)


class FrozenRD(ReferenceBN):
    """Renorm with r and d fixed, so finite differences see them as constants (Keras stops
    their gradients)."""

    def __init__(self, *, r: np.ndarray, d: np.ndarray, **kw: Any) -> None:
        super().__init__(**kw)
        self._frozen = (np.asarray(r), np.asarray(d))

    def _renorm_correction(self, mean: np.ndarray, var: np.ndarray) -> tuple[Any, Any]:
        r, d = self._frozen
        return np.broadcast_to(r, self.param_shape), np.broadcast_to(d, self.param_shape)


def rng_x(shape: tuple[int, ...], seed: int = 1, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.3, scale, shape)


# ============================================================================ weights
def test_weight_shapes_order_and_init() -> None:
    layer = make_layer((2, 3, 4, 5))
    assert layer._weight_names() == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.shape for w in layer.get_weights()] == [(5,)] * 4
    np.testing.assert_array_equal(layer.gamma, 1)
    np.testing.assert_array_equal(layer.moving_variance, 1)
    multi = make_layer((2, 3, 4, 5), axis=[3, 1])
    assert [w.shape for w in multi.get_weights()] == [(1, 3, 1, 5)] * 4
    rn = make_layer((2, 5), renorm=True, center=False)
    assert rn._weight_names() == [
        "gamma",
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    assert rn.beta is None
    np.testing.assert_array_equal(rn.moving_stddev, 1)
    np.testing.assert_array_equal(rn.renorm_mean, 0)
    np.testing.assert_array_equal(rn.renorm_stddev, 1)


def test_set_weights_checks_and_is_atomic() -> None:
    layer = make_layer((4, 3))
    before = layer.get_weights()
    with pytest.raises(ValueError):
        layer.set_weights(before[:3])
    bad = [w + 1 for w in before]
    bad[2] = np.zeros(4)
    with pytest.raises(ValueError):
        layer.set_weights(bad)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    layer.set_weights([np.full((1, 1, 3), 2.0)] * 4)  # same size, another Keras layout
    assert layer.gamma.shape == (3,)


@pytest.mark.parametrize(
    "kw, shape",
    [
        ({"axis": 4}, (2, 3, 4, 5)),
        ({"axis": [1, -3]}, (2, 3, 4, 5)),
        ({"axis": [1, 1]}, (2, 3, 4, 5)),
        ({"axis": 0, "virtual_batch_size": 2}, (4, 3)),
    ],
)
def test_build_errors(kw: dict[str, Any], shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        make_layer(shape, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"axis": 1.5},
        {"axis": [1, "a"]},
        {"epsilon": 0.0},
        {"momentum": 1.5},
        {"renorm_clipping": {"rmax": 1.0, "foo": 2.0}},
        {"renorm_clipping": {"rmax": 1.0, "rmin": 2.0}},
        {"renorm_clipping": {"dmax": -1.0}},
        {"virtual_batch_size": 0},
        {"virtual_batch_size": 2, "adjustment": lambda s: (1.0, 0.0)},
    ],
)
def test_constructor_errors(kw: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        ReferenceBN(**kw)


# ============================================================================ forward values
def test_inference_formula_and_default_mode() -> None:
    x = rng_x((3, 2, 4))
    layer = make_layer(x.shape)
    ws = random_weights(layer, np.random.default_rng(3))
    layer.set_weights(ws)
    gamma, beta, mm, mv = ws
    expected = (x - mm) / np.sqrt(mv + EPS) * gamma + beta
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-14)
    # A mask plays no role in inference, and nothing is updated.
    mask = np.zeros((3, 2), bool)
    np.testing.assert_allclose(layer.forward(x, mask=mask), expected, rtol=1e-14)
    for a, b in zip(layer.get_weights(), ws):
        np.testing.assert_array_equal(a, b)


def test_trainable_false_forces_inference() -> None:
    x = rng_x((5, 3))
    layer = make_layer(x.shape, trainable=False)
    y = layer.forward(x, training=True)
    np.testing.assert_allclose(y, x / np.sqrt(1 + EPS))
    np.testing.assert_array_equal(layer.moving_mean, 0)
    np.testing.assert_array_equal(layer.moving_variance, 1)


def test_training_and_moving_update_by_hand() -> None:
    x = np.array([[1.0], [2.0], [6.0]])  # mean 3, biased variance 14/3
    layer = make_layer(
        x.shape, [np.array([2.0]), np.array([0.5]), np.array([0.0]), np.array([1.0])], momentum=0.5
    )
    y = layer.forward(x, training=True)
    np.testing.assert_allclose(y, (x - 3.0) / np.sqrt(14 / 3 + EPS) * 2.0 + 0.5, rtol=1e-14)
    np.testing.assert_allclose(layer.moving_mean, [1.5])
    np.testing.assert_allclose(layer.moving_variance, [0.5 + 0.5 * 14 / 3])
    layer.forward(x, training=True)  # a second step decays again
    np.testing.assert_allclose(layer.moving_mean, [0.75 + 1.5])
    np.testing.assert_allclose(layer.moving_variance, [0.5 * (0.5 + 7 / 3) + 7 / 3])


def test_nchw_axis1_equals_transposed_nhwc() -> None:
    x = rng_x((3, 4, 2, 5))  # NCHW
    ws = random_weights(make_layer((3, 2, 5, 4)), np.random.default_rng(4))
    a = make_layer(x.shape, ws, axis=1)
    b = make_layer((3, 2, 5, 4), ws, axis=-1)
    ya = a.forward(x, training=True)
    yb = b.forward(np.transpose(x, (0, 2, 3, 1)), training=True)
    np.testing.assert_allclose(ya, np.transpose(yb, (0, 3, 1, 2)), rtol=1e-13)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-13)


def test_axis_list_statistics() -> None:
    x = rng_x((3, 4, 2, 5))
    layer = make_layer(x.shape, axis=[1, 3], momentum=0.0)
    y = layer.forward(x, training=True)
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = x.var(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + EPS), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-12)


def test_mask_uses_valid_positions_but_normalizes_all() -> None:
    x = rng_x((3, 4, 2))  # (B, T, C)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    layer = make_layer(x.shape, momentum=0.0)
    y = layer.forward(x, training=True, mask=mask)
    valid = x[mask]  # (n_valid, C)
    mean, var = valid.mean(axis=0), valid.var(axis=0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + EPS), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-12)
    # Masked values (even NaN) do not reach the statistics.
    x_nan = x.copy()
    x_nan[~mask] = np.nan
    y_nan = make_layer(x.shape).forward(x_nan, training=True, mask=mask.astype(np.float32))
    np.testing.assert_allclose(y_nan[mask], y[mask], rtol=1e-12)


def test_mask_shapes() -> None:
    x = rng_x((3, 4, 2))
    full = np.array([[1, 0, 1, 1]] * 3)
    y_full = make_layer(x.shape).forward(x, training=True, mask=full)
    y_bcast = make_layer(x.shape).forward(x, training=True, mask=np.array([[1, 0, 1, 1]]))
    np.testing.assert_allclose(y_full, y_bcast, rtol=1e-14)
    # NCHW, axis 1: a per-pixel mask is full rank, (B, 1, H, W).
    xc = rng_x((2, 3, 4, 5))
    m = np.random.default_rng(0).random((2, 4, 5)) > 0.3
    yc = make_layer(xc.shape, axis=1, momentum=0.0).forward(xc, training=True, mask=m[:, None])
    sel = np.transpose(xc, (0, 2, 3, 1))[m]  # (n_valid, C)
    mean = sel.mean(axis=0)[None, :, None, None]
    var = sel.var(axis=0)[None, :, None, None]
    np.testing.assert_allclose(yc, (xc - mean) / np.sqrt(var + EPS), rtol=1e-12)
    # Keras' rank - 1 form on (B, C, T) with axis 1 is (B, C): each channel its own rows.
    xt = rng_x((5, 3, 4))
    mt = np.random.default_rng(1).random((5, 3)) > 0.4
    yt = make_layer(xt.shape, axis=1, momentum=0.0).forward(xt, training=True, mask=mt)
    for c in range(3):
        rows = xt[mt[:, c], c, :]
        expected = (xt[:, c, :] - rows.mean()) / np.sqrt(rows.var() + EPS)
        np.testing.assert_allclose(yt[:, c, :], expected, rtol=1e-12, atol=1e-14)
    bad_masks = (np.ones((3, 5)), np.ones((3, 4, 3)), np.full((3, 4), 2.0), np.ones(4))
    for bad in bad_masks:
        with pytest.raises(ValueError):
            make_layer(x.shape).forward(x, training=True, mask=bad)


def test_all_masked_uses_zero_stats_and_keeps_moving() -> None:
    x = rng_x((4, 3))
    layer = make_layer(x.shape)
    ws = random_weights(layer, np.random.default_rng(5))
    layer.set_weights(ws)
    y = layer.forward(x, training=True, mask=np.zeros(4, bool))
    np.testing.assert_allclose(y, x / math.sqrt(EPS) * ws[0] + ws[1], rtol=1e-13)
    for a, b in zip(layer.get_weights(), ws):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw", [{}, {"virtual_batch_size": 2}, {"renorm": True}])
def test_zero_size_batch(kw: dict[str, Any]) -> None:
    layer = make_layer((4, 3), **kw)
    ws = random_weights(layer, np.random.default_rng(6))
    layer.set_weights(ws)
    x = np.zeros((0, 3))
    y = layer.forward(x, training=True)
    assert y.shape == (0, 3)
    for a, b in zip(layer.get_weights(), ws):
        np.testing.assert_array_equal(a, b)
    dx, dgamma, dbeta = layer.backward(np.zeros((0, 3)))
    assert dx.shape == (0, 3)
    np.testing.assert_array_equal(dgamma, 0)
    np.testing.assert_array_equal(dbeta, 0)


def test_nan_stays_in_its_feature() -> None:
    x = rng_x((4, 3))
    x[1, 1] = np.nan
    layer = make_layer(x.shape)
    y = layer.forward(x, training=True)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert np.isfinite(layer.moving_mean[[0, 2]]).all()


# ============================================================================ ghost batches
def test_ghost_batches_are_interleaved() -> None:
    x = np.array([[0.0], [10.0], [2.0], [14.0]])
    layer = make_layer(x.shape, virtual_batch_size=2, momentum=0.0)
    y = layer.forward(x, training=True)
    # G = 2: ghost 0 = samples {0, 2} (mean 1, var 1), ghost 1 = samples {1, 3} (mean 12, var 4).
    expected = np.array(
        [
            [-1 / math.sqrt(1 + EPS)],
            [-2 / math.sqrt(4 + EPS)],
            [1 / math.sqrt(1 + EPS)],
            [2 / math.sqrt(4 + EPS)],
        ]
    )
    np.testing.assert_allclose(y, expected, rtol=1e-14)
    # Moving statistics: mean over ghost batches of their means and variances.
    np.testing.assert_allclose(layer.moving_mean, [6.5])
    np.testing.assert_allclose(layer.moving_variance, [2.5])


def test_ghost_groups_of_three() -> None:
    x = rng_x((6, 2, 3))
    layer = make_layer(x.shape, virtual_batch_size=3, momentum=0.0)
    y = layer.forward(x, training=True)
    means, variances = [], []
    for j in range(2):  # G = 2 ghost batches of V = 3: samples j, j+2, j+4
        sub = x[j::2]
        mu, var = sub.mean(axis=(0, 1)), sub.var(axis=(0, 1))
        np.testing.assert_allclose(y[j::2], (sub - mu) / np.sqrt(var + EPS), rtol=1e-12)
        means.append(mu)
        variances.append(var)
    np.testing.assert_allclose(layer.moving_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, np.mean(variances, axis=0), rtol=1e-12)
    with pytest.raises(ValueError):
        layer.forward(rng_x((4, 2, 3)), training=True)
    # Inference uses the whole batch with the moving statistics (any batch size).
    assert layer.forward(rng_x((5, 2, 3))).shape == (5, 2, 3)


def test_ghost_with_mask_skips_empty_ghost_batches() -> None:
    x = np.array([[1.0], [5.0], [3.0], [9.0]])
    layer = make_layer(x.shape, virtual_batch_size=2, momentum=0.0)
    mask = np.array([1, 0, 1, 0])  # ghost 0 = {0, 2} valid, ghost 1 = {1, 3} masked out
    y = layer.forward(x, training=True, mask=mask)
    np.testing.assert_allclose(y[[0, 2]], [[-1 / math.sqrt(1 + EPS)], [1 / math.sqrt(1 + EPS)]])
    np.testing.assert_allclose(y[[1, 3]], x[[1, 3]] / math.sqrt(EPS))  # μ = σ² = 0
    np.testing.assert_allclose(layer.moving_mean, [2.0])  # only ghost 0 counts
    np.testing.assert_allclose(layer.moving_variance, [1.0])
    before = layer.get_weights()
    layer.forward(x, training=True, mask=np.zeros(4))
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)


# ============================================================================ renorm
def test_renorm_by_hand() -> None:
    x = np.array([[1.0], [3.0]])  # mean 2, variance 1
    s = math.sqrt(1 + EPS)
    ws = [
        np.array([1.5]),
        np.array([0.25]),
        np.array([0.0]),
        np.array([1.0]),
        np.array([1.2]),
        np.array([1.0]),
        np.array([2.0]),
    ]
    layer = make_layer(x.shape, ws, renorm=True, momentum=0.5, renorm_momentum=0.25)
    y = layer.forward(x, training=True)
    r, d = s / 2.0, (2.0 - 1.0) / 2.0
    xhat = (x - 2.0) / s
    np.testing.assert_allclose(y, (xhat * r + d) * 1.5 + 0.25, rtol=1e-14)
    np.testing.assert_allclose(layer.renorm_mean, [1.0 * 0.25 + 2.0 * 0.75])
    np.testing.assert_allclose(layer.renorm_stddev, [2.0 * 0.25 + s * 0.75])
    np.testing.assert_allclose(layer.moving_mean, [1.0])
    ms = 1.2 * 0.5 + s * 0.5
    np.testing.assert_allclose(layer.moving_stddev, [ms])
    np.testing.assert_allclose(layer.moving_variance, [ms * ms - EPS])  # assigned, not averaged


def test_renorm_clipping_and_floor() -> None:
    x = np.array([[1.0, 0.0], [3.0, 0.0]])  # feature 1 has zero variance
    ws = [
        np.ones(2),
        np.zeros(2),
        np.zeros(2),
        np.ones(2),
        np.ones(2),
        np.array([-10.0, 0.0]),
        np.array([0.5, 0.0]),
    ]
    layer = make_layer(
        x.shape, ws, renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.9, "dmax": 2.0}
    )
    layer.forward(x, training=True)
    r, d = layer._cache["r"].ravel(), layer._cache["d"].ravel()
    # feature 0: r = sqrt(1+ε)/0.5 → 1.5, d = 12/0.5 → 2; feature 1: ŝ = sqrt(ε) so r = 1 (in
    # range), d = 0.
    np.testing.assert_allclose(r, [1.5, 1.0])
    np.testing.assert_allclose(d, [2.0, 0.0])
    # Tight moving stddev: MV = max(ms² − ε, 0) clamps at 0.
    ws2 = [np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)]
    layer2 = make_layer(x.shape, ws2, renorm=True, momentum=1.0)
    layer2.forward(x, training=True)
    np.testing.assert_array_equal(layer2.moving_variance, [0.0, 0.0])


def test_renorm_with_ghost_uses_averaged_statistics() -> None:
    x = rng_x((6, 3))
    layer = make_layer(x.shape, renorm=True, virtual_batch_size=2)
    ws = random_weights(layer, np.random.default_rng(8))
    layer.set_weights(ws)
    layer.forward(x, training=True)
    groups = [x[j::3] for j in range(3)]
    mean = np.mean([g.mean(axis=0) for g in groups], axis=0)
    var = np.mean([g.var(axis=0) for g in groups], axis=0)
    s_hat = np.maximum(ws[6], math.sqrt(EPS))
    np.testing.assert_allclose(layer._cache["r"].ravel(), np.sqrt(var + EPS) / s_hat)
    np.testing.assert_allclose(layer._cache["d"].ravel(), (mean - ws[5]) / s_hat)
    np.testing.assert_allclose(layer.moving_mean, ws[2] * 0.99 + mean * 0.01)


# ============================================================================ adjustment
def test_adjustment() -> None:
    x = rng_x((3, 4, 2, 2))  # NCHW, axis 1: (C,) terms must land on axis 1
    seen: list[tuple[int, ...]] = []
    a_s, a_b = np.array([1.1, 0.9, 1.0, 1.2]), np.array([0.1, -0.1, 0.0, 0.05])

    def adjustment(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        seen.append(tuple(shape))
        return a_s, a_b

    plain = make_layer(x.shape, axis=1)
    adj = make_layer(x.shape, axis=1, adjustment=adjustment)
    y0 = plain.forward(x, training=True)
    y1 = adj.forward(x, training=True)
    assert seen == [x.shape]
    np.testing.assert_allclose(y1, y0 * a_s[:, None, None] + a_b[:, None, None], rtol=1e-13)
    for wa, wb in zip(plain.get_weights(), adj.get_weights()):
        np.testing.assert_array_equal(wa, wb)  # moving statistics untouched by adjustment
    np.testing.assert_allclose(adj.forward(x), plain.forward(x))  # inference: no adjustment


# ============================================================================ gradients
def _mask_btc() -> np.ndarray:
    return np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=bool)


GRAD_CASES: dict[str, tuple[tuple[int, ...], dict[str, Any], Any]] = {
    "nhwc": ((3, 2, 2, 3), {}, None),
    "nchw_axis1": ((2, 3, 2, 2), {"axis": 1}, None),
    "axis_list": ((2, 3, 2, 2), {"axis": [1, 3]}, None),
    "dense_no_affine": ((5, 3), {"center": False, "scale": False}, None),
    "center_only": ((5, 3), {"scale": False}, None),
    "mask_btc": ((3, 4, 2), {}, _mask_btc()),
    "mask_nchw": (
        (2, 2, 3, 2),
        {"axis": 1},
        np.array([[[[1, 0], [1, 1], [0, 1]]]], dtype=bool),  # (1, 1, H, W): per pixel
    ),
    "mask_bct_keras": ((3, 2, 4), {"axis": 1}, np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)),
    "mask_one_valid": ((3, 4, 2), {}, np.array([[0, 0, 1, 0]])),
    "mask_none_valid": ((3, 4, 2), {}, np.zeros((1, 4))),
    "ghost": ((6, 2, 2), {"virtual_batch_size": 3}, None),
    "ghost_mask": (
        (6, 2, 2),
        {"virtual_batch_size": 2},
        np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1], [0, 0]], dtype=bool),
    ),
    "renorm_clipped": (
        (4, 2, 3),
        {"renorm": True, "renorm_clipping": {"rmin": 0.5, "rmax": 2.0, "dmax": 0.3}},
        None,
    ),
    "adjustment": (
        (3, 4, 2),
        {"adjustment": lambda s: (np.array([1.2, 0.7]), np.array([0.1, -0.2]))},
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_training_gradients_match_finite_differences(case: str) -> None:
    shape, kw, mask = GRAD_CASES[case]
    x = rng_x(shape, seed=11)
    weights = None
    if kw.get("renorm"):
        # Renorm stats far from the batch ones: r and d sit on their clip bounds, constant
        # under small perturbations, which is exactly how the gradient treats them.
        probe = make_layer(shape, **kw)
        weights = random_weights(probe, np.random.default_rng(2))
        weights[-2] = np.full_like(weights[-2], -1000.0)  # renorm_mean → d = +dmax
        weights[-1] = np.full_like(weights[-1], 100.0)  # renorm_stddev → r = rmin
    check_gradients(x, training=True, mask=mask, weights=weights, **kw)


@pytest.mark.parametrize("kw", [{}, {"virtual_batch_size": 2}, {"axis": [1, 2]}])
def test_renorm_gradients_with_frozen_r_d(kw: dict[str, Any]) -> None:
    shape = (4, 3, 2)
    x = rng_x(shape, seed=12)
    real = make_layer(shape, renorm=True, **kw)
    ws = random_weights(real, np.random.default_rng(9))
    real.set_weights(ws)
    y = real.forward(x, training=True)
    r, d = real._cache["r"], real._cache["d"]
    assert not np.allclose(r, 1) and not np.allclose(d, 0)
    frozen = make_layer(shape, ws, cls=FrozenRD, r=r, d=d, renorm=True, **kw)
    np.testing.assert_allclose(frozen.forward(x, training=True), y, rtol=1e-14)
    dy = np.random.default_rng(0).standard_normal(shape)
    real2 = make_layer(shape, ws, renorm=True, **kw)
    real2.forward(x, training=True)
    frozen.forward(x, training=True)
    for a, b in zip(real2.backward(dy), frozen.backward(dy)):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    check_gradients(x, training=True, weights=ws, cls=FrozenRD, r=r, d=d, renorm=True, **kw)


@pytest.mark.parametrize(
    "kw", [{}, {"axis": 1}, {"renorm": True, "virtual_batch_size": 2}, {"trainable": False}]
)
def test_inference_gradients_match_finite_differences(kw: dict[str, Any]) -> None:
    x = rng_x((4, 3, 2), seed=13)
    training = bool(kw.get("trainable") is False)  # trainable=False: training=True is inference
    check_gradients(x, training=training, **kw)


def test_backward_matches_unmasked_textbook_formula() -> None:
    x = rng_x((5, 2, 3), seed=14)
    layer = make_layer(x.shape)
    ws = random_weights(layer, np.random.default_rng(1))
    layer.set_weights(ws)
    layer.forward(x, training=True)
    dy = np.random.default_rng(2).standard_normal(x.shape)
    dx, dgamma, dbeta = layer.backward(dy)
    mu, var = x.mean(axis=(0, 1)), x.var(axis=(0, 1))
    s = np.sqrt(var + EPS)
    xhat = (x - mu) / s
    g = dy * ws[0]
    expected = (g - g.mean(axis=(0, 1)) - xhat * (g * xhat).mean(axis=(0, 1))) / s
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dgamma, (dy * xhat).sum(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(dbeta, dy.sum(axis=(0, 1)), rtol=1e-12)


# ============================================================================ initializers
def test_constant_initializers() -> None:
    np.testing.assert_array_equal(initializers.Zeros()((2, 3)), np.zeros((2, 3), np.float32))
    ones = initializers.get("ones")(4, dtype="float64")
    assert ones.dtype == np.float64 and ones.shape == (4,) and (ones == 1).all()
    c = initializers.Constant(0.5)((3,))
    assert c.dtype == np.float32 and (c == 0.5).all()
    np.testing.assert_array_equal(initializers.Constant([1, 2])((3, 2)), [[1, 2]] * 3)
    assert initializers.Zeros()((3,), dtype=None).dtype == np.float32


@pytest.mark.parametrize(
    "name, cls",
    [
        ("zeros", "Zeros"),
        ("zero", "Zeros"),
        ("Zeros", "Zeros"),
        ("ones", "Ones"),
        ("one", "Ones"),
        ("constant", "Constant"),
        ("random_normal", "RandomNormal"),
        ("normal", "RandomNormal"),
        ("random_uniform", "RandomUniform"),
        ("uniform", "RandomUniform"),
        ("truncated_normal", "TruncatedNormal"),
        ("glorot_uniform", "GlorotUniform"),
        ("GlorotNormal", "GlorotNormal"),
        ("he_normal", "HeNormal"),
        ("he_uniform", "HeUniform"),
        ("lecun_normal", "LecunNormal"),
        ("lecun_uniform", "LecunUniform"),
        ("variance_scaling", "VarianceScaling"),
    ],
)
def test_initializer_identifiers(name: str, cls: str) -> None:
    assert type(initializers.get(name)) is getattr(initializers, cls)


def test_initializer_get_forms_and_errors() -> None:
    assert initializers.get(None) is None
    inst = initializers.Constant(2.0)
    assert initializers.get(inst) is inst
    assert type(initializers.get(initializers.HeNormal)) is initializers.HeNormal

    def fn(shape: Any, dtype: Any = None) -> np.ndarray:
        return np.full(shape, 7.0)

    assert initializers.get(fn) is fn
    k3 = {
        "module": "keras.initializers",
        "class_name": "Constant",
        "config": {"value": 0.5},
        "registered_name": None,
    }
    k2 = {"class_name": "Constant", "config": {"value": 0.5}}
    for cfg in (k3, k2):
        got = initializers.get(cfg)
        assert isinstance(got, initializers.Constant) and got.value == 0.5
    with pytest.raises(ValueError, match="no_such_init"):
        initializers.get("no_such_init")
    with pytest.raises(ValueError, match="Nope"):
        initializers.get({"class_name": "Nope", "config": {}})
    with pytest.raises(ValueError):
        initializers.get({"class_name": "Constant", "config": {"bogus": 1}})
    with pytest.raises(TypeError, match="42"):
        initializers.get(42)
    with pytest.raises(TypeError):
        initializers.get(dict)  # a class that is no Initializer


ALL_INITS = [
    lambda: initializers.Zeros(),
    lambda: initializers.Ones(),
    lambda: initializers.Constant(0.25),
    lambda: initializers.RandomNormal(mean=1.0, stddev=0.5, seed=3),
    lambda: initializers.RandomUniform(minval=-2.0, maxval=1.0, seed=4),
    lambda: initializers.TruncatedNormal(mean=0.5, stddev=0.1, seed=None),
    lambda: initializers.VarianceScaling(scale=2.0, mode="fan_avg", distribution="uniform", seed=5),
    lambda: initializers.GlorotUniform(seed=1),
    lambda: initializers.GlorotNormal(),
    lambda: initializers.HeUniform(seed=2),
    lambda: initializers.HeNormal(),
    lambda: initializers.LecunUniform(),
    lambda: initializers.LecunNormal(seed=9),
]


@pytest.mark.parametrize("i", range(len(ALL_INITS)))
def test_initializer_config_round_trip(i: int) -> None:
    init = ALL_INITS[i]()
    cfg = initializers.serialize(init)
    assert cfg["module"] == "keras.initializers"
    assert cfg["class_name"] == type(init).__name__ and cfg["registered_name"] is None
    back = initializers.deserialize(cfg)
    assert type(back) is type(init) and back.get_config() == init.get_config()
    legacy = {"class_name": cfg["class_name"], "config": cfg["config"]}
    assert initializers.get(legacy).get_config() == init.get_config()
    if init.get_config().get("seed") is not None:  # seeded: same values after round trip
        np.testing.assert_array_equal(back((3, 4)), init((3, 4)))


def test_initializer_serialize_exact_and_functions() -> None:
    assert initializers.serialize(initializers.Constant(0.5)) == {
        "module": "keras.initializers",
        "class_name": "Constant",
        "config": {"value": 0.5},
        "registered_name": None,
    }
    assert initializers.serialize(initializers.GlorotUniform())["config"] == {"seed": None}
    assert initializers.serialize(None) is None

    def my_init(shape: Any, dtype: Any = None) -> np.ndarray:
        return np.zeros(shape)

    assert initializers.serialize(my_init) == "my_init"
    assert initializers.deserialize("my_init", custom_objects={"my_init": my_init}) is my_init
    with pytest.raises(ValueError):
        initializers.serialize(lambda shape, dtype=None: np.zeros(shape))


def test_compute_fans() -> None:
    assert initializers.compute_fans((7,)) == (7, 7)
    assert initializers.compute_fans((3, 5)) == (3, 5)
    assert initializers.compute_fans((3, 3, 16, 32)) == (144, 288)
    assert initializers.compute_fans(()) == (1, 1)


def test_random_initializer_statistics() -> None:
    n = 40000
    he = initializers.HeNormal(seed=0)((n,))  # fan_in = n; truncated, stddev sqrt(2/n)
    assert he.dtype == np.float32
    assert abs(he.std() / math.sqrt(2 / n) - 1) < 0.03
    assert np.abs(he).max() <= 2 * math.sqrt(2 / n) / 0.87962566103423978 * (1 + 1e-6)
    gu = initializers.GlorotUniform(seed=0)((200, 300))
    limit = math.sqrt(6 / 500)
    assert np.abs(gu).max() <= limit and np.abs(gu).max() > 0.99 * limit
    lu = initializers.LecunUniform(seed=0)((100, 100))
    assert np.abs(lu).max() <= math.sqrt(3 / 100)
    tn = initializers.TruncatedNormal(mean=1.0, stddev=0.5, seed=1)((n,), dtype="float64")
    assert tn.dtype == np.float64 and np.abs(tn - 1.0).max() <= 1.0
    rn = initializers.RandomNormal(mean=2.0, stddev=0.1, seed=1)((n,))
    assert abs(rn.mean() - 2.0) < 0.01 and abs(rn.std() - 0.1) < 0.005
    ru = initializers.RandomUniform(-1.0, 3.0, seed=1)((n,))
    assert ru.min() >= -1.0 and ru.max() < 3.0
    vs = initializers.VarianceScaling(distribution="untruncated_normal", seed=0)((n,))
    assert abs(vs.std() / math.sqrt(1 / n) - 1) < 0.03


def test_random_initializer_seeding_and_errors() -> None:
    a = initializers.RandomNormal(seed=7)
    np.testing.assert_array_equal(a((5,)), initializers.RandomNormal(seed=7)((5,)))
    np.testing.assert_array_equal(a((5,)), a((5,)))  # Keras 3: repeated calls repeat values
    unseeded = initializers.GlorotNormal()
    np.testing.assert_array_equal(unseeded((4, 4)), unseeded((4, 4)))
    assert not np.array_equal(
        initializers.RandomNormal(seed=1)((5,)), initializers.RandomNormal(seed=2)((5,))
    )
    assert initializers.VarianceScaling(distribution="normal").distribution == "truncated_normal"
    with pytest.raises(ValueError):
        initializers.VarianceScaling(scale=0.0)
    with pytest.raises(ValueError):
        initializers.VarianceScaling(mode="fan_max")
    with pytest.raises(ValueError):
        initializers.VarianceScaling(distribution="cauchy")
    with pytest.raises(ValueError):
        initializers.RandomNormal(seed="x")
    with pytest.raises(ValueError):
        initializers.RandomNormal()((3,), dtype="int32")


# ============================================================================ regularizers
def test_regularizer_values_and_gradients() -> None:
    w = np.array([[-1.5, 0.0], [2.0, 0.5]], dtype=np.float32)
    l1, l2, both = regularizers.L1(0.1), regularizers.L2(0.2), regularizers.L1L2(0.1, 0.2)
    assert math.isclose(l1(w), 0.1 * 4.0)
    assert math.isclose(l2(w), 0.2 * (2.25 + 4.0 + 0.25))
    assert math.isclose(both(w), l1(w) + l2(w))
    g1 = l1.gradient(w)
    assert g1.dtype == np.float32
    np.testing.assert_allclose(g1, 0.1 * np.array([[-1, 0], [1, 1]]))  # sign(0) = 0
    np.testing.assert_allclose(l2.gradient(w), 0.4 * w)
    np.testing.assert_allclose(both.gradient(w), g1 + 0.4 * w, rtol=1e-6)
    assert regularizers.L1L2()(w) == 0.0
    # Analytic gradients agree with the finite-difference fallback away from the kink.
    w64 = np.array([-1.5, 0.3, 2.0])
    for reg in (l1, l2, both):
        np.testing.assert_allclose(
            reg.gradient(w64), regularizers.finite_difference_gradient(reg, w64), rtol=1e-7
        )


def test_regularizer_callables_use_finite_differences() -> None:
    def cubic(w: np.ndarray) -> float:
        return float(np.sum(w**3))

    assert regularizers.get(cubic) is cubic
    w = np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(regularizers.gradient(cubic, w), 3 * w**2, rtol=1e-8)

    class Quartic(regularizers.Regularizer):
        def __call__(self, w: Any) -> float:
            return float(np.sum(np.asarray(w) ** 4))

    np.testing.assert_allclose(Quartic().gradient(w), 4 * w**3, rtol=1e-8)
    np.testing.assert_allclose(regularizers.gradient(regularizers.L2(0.5), w), w)


@pytest.mark.parametrize(
    "name, cls, config",
    [
        ("l1", "L1", {"l1": 0.01}),
        ("L1", "L1", {"l1": 0.01}),
        ("l2", "L2", {"l2": 0.01}),
        ("L2", "L2", {"l2": 0.01}),
        ("l1_l2", "L1L2", {"l1": 0.01, "l2": 0.01}),  # tf-keras 2 / Keras 3 docs values
        ("l1l2", "L1L2", {"l1": 0.0, "l2": 0.0}),  # Keras 3's snake name: class defaults
        ("L1L2", "L1L2", {"l1": 0.0, "l2": 0.0}),
    ],
)
def test_regularizer_identifiers(name: str, cls: str, config: dict[str, float]) -> None:
    reg = regularizers.get(name)
    assert type(reg) is getattr(regularizers, cls) and reg.get_config() == config


def test_regularizer_configs_and_errors() -> None:
    assert regularizers.get(None) is None
    for cfg in (
        {"class_name": "L2", "config": {"l2": 0.5}},
        {
            "module": "keras.regularizers",
            "class_name": "L2",
            "config": {"l2": 0.5},
            "registered_name": None,
        },
    ):
        assert regularizers.get(cfg).get_config() == {"l2": 0.5}
    for reg in (regularizers.L1(0.3), regularizers.L2(0.0), regularizers.L1L2(l1=0.2, l2=0.1)):
        cfg = regularizers.serialize(reg)
        assert cfg["module"] == "keras.regularizers" and cfg["class_name"] == type(reg).__name__
        back = regularizers.deserialize(cfg)
        assert type(back) is type(reg) and back.get_config() == reg.get_config()
    assert regularizers.L1(None).l1 == 0.01
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError):
            regularizers.L2(bad)
    with pytest.raises(ValueError, match="l3"):
        regularizers.get("l3")
    with pytest.raises(TypeError):
        regularizers.get(1.0)
    with pytest.raises(ValueError):
        regularizers.serialize(lambda w: 0.0)


# ============================================================================ constraints
def test_constraint_values() -> None:
    e = constraints.EPSILON
    assert e == 1e-7
    w = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    out = constraints.NonNeg()(w)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.0, 0.0, 2.0])
    v = np.array([3.0, 4.0])  # norm 5
    np.testing.assert_allclose(constraints.MaxNorm(2)(v), v * 2 / (e + 5), rtol=1e-15)
    np.testing.assert_allclose(constraints.MaxNorm(7)(v), v * 5 / (e + 5), rtol=1e-15)
    np.testing.assert_allclose(constraints.UnitNorm()(v), v / (e + 5), rtol=1e-15)
    np.testing.assert_allclose(
        constraints.MinMaxNorm(6.0, 8.0, rate=0.5)(v), v * (0.5 * 6 + 0.5 * 5) / (e + 5), rtol=1e-15
    )
    np.testing.assert_array_equal(constraints.UnitNorm()(np.zeros(3)), 0)  # ε keeps 0 finite
    m = np.array([[3.0, 0.0], [4.0, 1.0]])  # column norms 5 and 1 (axis 0)
    np.testing.assert_allclose(
        constraints.MaxNorm(2, axis=0)(m), m * np.array([2 / (e + 5), 1 / (e + 1)]), rtol=1e-15
    )
    np.testing.assert_allclose(constraints.UnitNorm(axis=[0, 1])(m), m / (e + math.sqrt(26)))
    f32 = constraints.MaxNorm(1)(np.array([3.0, 4.0], dtype=np.float32))
    assert f32.dtype == np.float32


@pytest.mark.parametrize(
    "name, cls",
    [
        ("non_neg", "NonNeg"),
        ("NonNeg", "NonNeg"),
        ("max_norm", "MaxNorm"),
        ("MaxNorm", "MaxNorm"),
        ("min_max_norm", "MinMaxNorm"),
        ("MinMaxNorm", "MinMaxNorm"),
        ("unit_norm", "UnitNorm"),
        ("UnitNorm", "UnitNorm"),
    ],
)
def test_constraint_identifiers(name: str, cls: str) -> None:
    assert type(constraints.get(name)) is getattr(constraints, cls)


def test_constraint_configs_and_errors() -> None:
    for c in (
        constraints.NonNeg(),
        constraints.MaxNorm(3, axis=[0, 1]),
        constraints.MinMaxNorm(0.5, 2.0, rate=0.3, axis=1),
        constraints.UnitNorm(axis=1),
    ):
        cfg = constraints.serialize(c)
        assert cfg["module"] == "keras.constraints" and cfg["registered_name"] is None
        back = constraints.deserialize(cfg)
        assert type(back) is type(c) and back.get_config() == c.get_config()
        legacy = constraints.get({"class_name": type(c).__name__, "config": c.get_config()})
        assert legacy.get_config() == c.get_config()
    assert constraints.MaxNorm().get_config() == {"max_value": 2, "axis": 0}
    assert constraints.MinMaxNorm().get_config() == {
        "min_value": 0.0,
        "max_value": 1.0,
        "rate": 1.0,
        "axis": 0,
    }

    def clip(w: np.ndarray) -> np.ndarray:
        return np.clip(w, -1, 1)

    assert constraints.get(clip) is clip
    assert constraints.serialize(clip) == "clip"
    assert constraints.get(None) is None
    with pytest.raises(ValueError, match="max_nrom"):
        constraints.get("max_nrom")
    with pytest.raises(TypeError):
        constraints.get([1, 2])


def test_real_keras_objects_are_rebuilt() -> None:
    # Stand-in for a keras.constraints.MaxNorm instance (no TensorFlow needed).
    fake_cls = type(
        "MaxNorm",
        (),
        {
            "__module__": "keras.src.constraints.constraints",
            "get_config": lambda self: {"max_value": 3.0, "axis": 0},
            "__call__": lambda self, w: w,
        },
    )
    got = constraints.get(fake_cls())
    assert type(got) is constraints.MaxNorm and got.max_value == 3.0


def test_custom_subclass_serialization() -> None:
    class Halve(constraints.Constraint):
        def __call__(self, w: Any) -> np.ndarray:
            return np.asarray(w) / 2

    cfg = constraints.serialize(Halve())
    assert cfg["class_name"] == "Halve" and cfg["registered_name"] == "Halve"
    with pytest.raises(ValueError):
        constraints.deserialize(cfg)
    assert type(constraints.deserialize(cfg, custom_objects={"Halve": Halve})) is Halve
