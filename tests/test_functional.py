"""batchnorm.functional, the stateless core the layer stands on: options validated once and
frozen, each call differentiated with its own context, and the layer's refusal to differentiate
a call whose statistics are gone."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm
from batchnorm import functional as F

from reference import ReferenceBN


def test_options_are_validated_once_and_frozen() -> None:
    options = F.Options(axis=1, momentum=0.9)
    assert options.core.axes == [1] and options.core.momentum == 0.9
    with pytest.raises(AttributeError, match="frozen"):
        options.momentum = 0.5  # type: ignore[misc]
    changed = options.replace(momentum=0.5)
    assert changed.momentum == 0.5 and options.momentum == 0.9
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        options.replace(momentum=1.5)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        F.Options(momentum="0.9")
    with pytest.raises(ValueError, match="axis 0 cannot be a feature axis"):
        F.Options(axis=0, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"rmax \(1\) must be >= rmin \(2\)"):
        F.Options(renorm=True, renorm_clipping={"rmin": 2, "rmax": 1})
    with pytest.raises(TypeError, match="has no colour"):
        options.replace(colour=1)
    assert F.Options(renorm=True).weight_names() == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    assert F.Options(center=False, scale=False).weight_names() == ["moving_mean", "moving_variance"]


def test_the_core_owns_the_rules() -> None:
    """The layer's messages are the core's: one rule, one message, in every language."""
    with pytest.raises(ValueError, match=r"batchnorm\.validate: epsilon must be > 0, got 0"):
        batchnorm.BatchNormalization(epsilon=0.0)
    layer = batchnorm.BatchNormalization(axis=[1, -2])
    with pytest.raises(ValueError, match=r"axes contain duplicates once resolved \(axis 1\)"):
        layer.build((2, 3, 4))
    schema = F.Options(axis=[1, 3]).schema((None, 5, 6, 7))
    assert list(schema.axes) == [1, 3] and list(schema.weight_shape) == [1, 5, 1, 7]
    assert schema.features == 35


def test_layer_hyper_parameters_set_through_validated_options() -> None:
    layer = batchnorm.BatchNormalization()
    layer.momentum = 0.5
    assert layer.momentum == 0.5 and layer.options.core.momentum == 0.5
    with pytest.raises(ValueError, match="momentum must be in"):
        layer.momentum = 2.0
    assert layer.momentum == 0.5  # unchanged after the refused value
    with pytest.raises(AttributeError):
        layer.center = False  # type: ignore[misc]  # decides which weights exist


def test_functional_matches_the_reference_and_each_context_is_its_own() -> None:
    rng = np.random.default_rng(0)
    options = F.Options(axis=1, momentum=0.5)
    weights = F.initial_weights(options, (6, 4, 5), dtype="float64")
    ref = ReferenceBN(axis=1, momentum=0.5)
    x1, x2 = rng.normal(1.0, 2.0, (6, 4, 5)), rng.normal(-3.0, 0.5, (6, 4, 5))
    dy1, dy2 = rng.normal(size=x1.shape), rng.normal(size=x1.shape)
    y1, context1 = F.forward(x1, weights, options, training=True)
    y2, context2 = F.forward(x2, weights, options, training=True)
    # Differentiated in reverse order, as autograd does: each call with its own statistics.
    dx2, dgamma2, _ = F.backward(dy2, context2)
    dx1, dgamma1, dbeta1 = F.backward(dy1, context1)
    for x, y, dy, dx, dgamma in ((x1, y1, dy1, dx1, dgamma1), (x2, y2, dy2, dx2, dgamma2)):
        np.testing.assert_allclose(y, ref.forward(x, training=True), atol=1e-12)
        want_dx, want_dgamma, want_dbeta = ref.backward(dy)
        np.testing.assert_allclose(dx, want_dx, atol=1e-12)
        np.testing.assert_allclose(dgamma, want_dgamma.reshape(-1), atol=1e-12)
    np.testing.assert_allclose(dbeta1, dy1.sum(axis=(0, 2)), atol=1e-12)
    np.testing.assert_allclose(weights["moving_mean"], ref.moving_mean.reshape(-1), atol=1e-12)


def test_statistics_objects_are_reused_only_once_freed() -> None:
    """A training call's statistics object comes from those Python freed (the pool keeps their
    vectors): one still held is never handed out again, and a reused one gives the next call its
    own results, bit for bit, whatever it held (other features, ghost groups, a mask, renorm)."""
    rng = np.random.default_rng(12)
    x = rng.normal(2.0, 3.0, (48, 6))
    dy = rng.normal(size=x.shape)
    options = F.Options(momentum=0.5)

    def step() -> tuple[bytes, ...]:
        weights = F.initial_weights(options, x.shape, dtype="float64")
        y, context = F.forward(x, weights, options, training=True)
        dx, dgamma, dbeta = F.backward(dy, context)
        return y.tobytes(), dx.tobytes(), dgamma.tobytes(), dbeta.tobytes()

    layer = batchnorm.BatchNormalization(momentum=0.5, dtype="float64")
    expected = step()
    plain = layer(x, training=True), layer.backward(dy)
    others = [
        (F.Options(axis=1, virtual_batch_size=4), rng.normal(-5.0, 0.1, (16, 9, 3)), None),
        (F.Options(virtual_batch_size=8), rng.normal(7.0, 2.0, (48, 6)), None),
        (F.Options(), rng.normal(1.0, 1.0, (30, 6)), rng.random((30,)) > 0.5),
        (  # renorm away from the moving statistics: r and d are not 1 and 0
            F.Options(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}),
            rng.normal(-5.0, 4.0, (40, 6)),
            None,
        ),
    ]
    for other_options, other_x, mask in others:
        weights = F.initial_weights(other_options, other_x.shape, dtype="float64")
        held = [
            F.forward(other_x, weights, other_options, training=True, mask=mask)[1]
            for _ in range(3)
        ]
        assert len({id(c.statistics) for c in held}) == 3  # none handed out twice while held
        del held
        assert step() == expected
        y = layer(x, training=True)
        assert y.tobytes() == plain[0].tobytes()
        assert layer.backward(dy).tobytes() == plain[1].tobytes()
    # A pooled object holds no statistics before its forward: a backward would refuse it.
    empty = batchnorm._core.TrainingContext.pooled(6)
    assert (empty.groups, empty.features, empty.has_mask) == (0, 0, False)


def test_calls_share_the_weights_copy_until_the_weights_change() -> None:
    """Each plain call keeps a copy of the weights its backward reads; calls in a row share one
    while the weights keep their bytes, and a change of them (here in place, through
    set_weights) gives the next call a new copy: the backward of an inference call made after
    the change reads the new moving statistics."""
    rng = np.random.default_rng(13)
    x, dy = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
    layer = batchnorm.BatchNormalization(dtype="float64")
    layer(x)  # builds the layer (the general path)
    layer(x)
    kept = layer._last[2][0]
    layer(x)
    assert layer._last[2][0] is kept
    gamma, beta, mean, variance = layer.get_weights()
    layer.set_weights([gamma, beta, mean + 1.0, variance * 4.0])
    layer(x)
    assert layer._last[2][0] is not kept
    np.testing.assert_allclose(
        layer.backward(dy), dy * gamma / np.sqrt(variance * 4.0 + 1e-3), rtol=1e-12
    )
    layer.set_weights([gamma, beta, mean, variance])  # back to the bytes of the first copy
    layer(x)
    np.testing.assert_allclose(
        layer.backward(dy), dy * gamma / np.sqrt(variance + 1e-3), rtol=1e-12
    )


@pytest.mark.parametrize(("features", "steps"), [(4, 5), (3, 7), (8, 4), (20, 3)])
def test_a_row_mask_over_two_feature_axes_normalizes_exactly(features: int, steps: int) -> None:
    """A Keras-form (B, T) mask of a (B, T, C) input normalized over T and C (axis=[1, 2]): the
    statistics keep T and C apart (the mask steps along T only) while x and y merge them. With
    C < 16 no block of the statistics held the coefficients the output pass wraps around, which
    were once left unwritten (outputs of 1e18 or NaN)."""
    rng = np.random.default_rng(14)
    x = rng.normal(1.0, 2.0, (64, steps, features)).astype(np.float32)
    mask = rng.random((64, steps)) > 0.3
    options = F.Options(axis=[1, 2])
    y, context = F.forward(
        x, F.initial_weights(options, x.shape), options, training=True, mask=mask
    )
    valid = mask[:, :, None]
    count = valid.sum(axis=0)
    mean = (x * valid).sum(axis=0, dtype=np.float64) / count
    variance = (((x - mean) ** 2) * valid).sum(axis=0) / count
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(variance + 1e-3), atol=2e-5, rtol=1e-5)
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx, _, dbeta = F.backward(dy, context)
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dbeta.reshape(steps, features), dy.sum(axis=0), rtol=1e-4)


def test_layer_used_twice_refuses_an_ambiguous_backward() -> None:
    """Before: the first call's backward silently used the second call's statistics."""
    rng = np.random.default_rng(1)
    layer = batchnorm.BatchNormalization(dtype="float64")
    a, b = rng.normal(size=(8, 3)), rng.normal(5.0, 3.0, size=(8, 3))
    ya = layer(a, training=True)
    yb = layer(b, training=True)
    with pytest.raises(ValueError, match="2 outputs of training calls are alive"):
        layer.backward(np.ones_like(a))
    del ya  # the earlier output is gone: only the last call can be differentiated
    dx = layer.backward(np.ones_like(b))
    assert dx.shape == b.shape and yb is not None
    # An output kept after its backward does not block the next steps.
    history = [yb]
    for _ in range(3):
        history.append(layer(b, training=True))
        layer.backward(np.ones_like(b))


def test_layer_counts_each_output_once_and_a_retried_backward() -> None:
    """An `out=` written by two training calls is one output (the last call's); a backward that
    failed and was retried differentiates its call, whose output then no longer counts."""
    rng = np.random.default_rng(4)
    layer = batchnorm.BatchNormalization(dtype="float64")
    x = rng.normal(size=(8, 3))
    dy = rng.normal(size=x.shape)
    out = np.empty_like(x)
    layer(x * 2.0, training=True, out=out)
    layer(x, training=True, out=out)
    first = layer.backward(dy)  # the one output alive is the last call's: no refusal
    y = layer(x, training=True)
    with pytest.raises(ValueError):
        layer.backward(dy[:4])  # a dy of the wrong shape
    np.testing.assert_array_equal(layer.backward(dy), first)  # the same call again
    later = layer(x, training=True)  # y is still alive, but it was differentiated
    np.testing.assert_array_equal(layer.backward(dy), first)
    assert y is not None and later is not None


def test_backward_keeps_the_weights_of_its_call() -> None:
    """Before: a second backward after apply_gradients read the updated gamma."""
    rng = np.random.default_rng(2)
    layer = batchnorm.BatchNormalization(dtype="float64")
    x = rng.normal(size=(16, 4))
    dy = rng.normal(size=x.shape)
    layer(x, training=True)
    first = layer.backward(dy)
    layer.apply_gradients(0.5)
    np.testing.assert_array_equal(layer.backward(dy), first)
    # The same for an inference call followed by a training call that moves the statistics.
    layer(x)
    inference_dx = layer.backward(dy)
    kept = batchnorm.layer._context_of(layer._last)  # the inference call's context
    layer(x * 3.0, training=True)
    dx_again, _, _ = F.backward(dy, kept)
    np.testing.assert_array_equal(dx_again, inference_dx)


def test_bindings_take_named_keyword_arguments_and_bound_weights() -> None:
    from batchnorm import _core

    options = F.Options()
    weights = F.initial_weights(options, (4, 3))
    x = np.ones((4, 3), np.float32)
    bound = F.Weights(**weights)
    with pytest.raises(TypeError):
        _core.infer_forward(x, np.empty_like(x), options.core, bound)  # positional: refused
    with pytest.raises(TypeError, match="unexpected keyword argument 'moving_median'"):
        F.Weights(moving_median=weights["moving_mean"])
    y = np.empty_like(x)
    _core.infer_forward(x=x, y=y, options=options.core, weights=bound)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)
    assert bound.features == 3 and bound.dtype == "float32" and bound.names == list(weights)


def test_bound_weights_are_checked_when_bound_and_against_each_input() -> None:
    options = F.Options()
    weights = F.initial_weights(options, (4, 3))
    with pytest.raises(ValueError, match="beta: 2 values, but gamma has 3"):
        F.Weights(**{**weights, "beta": np.zeros(2, np.float32)})
    with pytest.raises(TypeError, match="beta: dtype float64 differs from gamma's float32"):
        F.Weights(**{**weights, "beta": np.zeros(3)})
    with pytest.raises(ValueError, match="contiguous 1-D vector"):
        F.Weights(gamma=np.ones((3, 1), np.float32))
    with pytest.raises(ValueError, match="contiguous 1-D vector"):
        F.Weights(gamma=np.ones(6, np.float32)[::2])
    bound = F.Weights(**weights)
    with pytest.raises(ValueError, match="expected a contiguous vector of 4 elements, got 3"):
        F.forward(np.ones((2, 4), np.float32), bound, options, training=False)
    with pytest.raises(TypeError, match="expected dtype float64 for float64 data, got float32"):
        F.forward(np.ones((2, 3)), bound, options, training=False)
    for training in (True, False):  # a mapping is bound per call, with the same result
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        y_mapping, _ = F.forward(x, F.initial_weights(options, (2, 3)), options, training=training)
        y_bound, _ = F.forward(
            x, F.Weights(**F.initial_weights(options, (2, 3))), options, training=training
        )
        np.testing.assert_array_equal(y_mapping, y_bound)


def test_snapshot_copies_the_named_vectors_only() -> None:
    options = F.Options()
    weights = F.initial_weights(options, (4, 3))
    bound = F.Weights(**weights)
    kept = bound.snapshot(["gamma", "moving_mean"])
    assert kept.vector("gamma") is None and kept.vector("beta") is weights["beta"]
    assert kept.has("gamma") and kept.has("moving_mean")
    weights["gamma"][:] = 5.0
    weights["moving_mean"][:] = 7.0
    weights["beta"][:] = 1.0
    x = np.zeros((1, 3), np.float32)
    y = np.empty_like(x)
    from batchnorm import _core

    _core.infer_forward(x=x, y=y, options=options.core, weights=kept)
    # gamma 1 and moving mean 0 as copied; beta read from the live vector
    np.testing.assert_allclose(y, np.ones_like(x), rtol=1e-6)
    with pytest.raises(ValueError, match="no weight called 'gama'"):
        bound.snapshot(["gama"])


def test_a_snapshot_of_a_snapshot_keeps_the_vectors_it_shares() -> None:
    """A forward on a context's weights copies only what its backward reads; the moving
    statistics it reads and updates stay in the earlier snapshot's copies, which must live as
    long as the later context does."""
    options = F.Options(momentum=0.5)
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=(8, 3)).astype(np.float32)
    _, inference = F.forward(x, F.initial_weights(options, x.shape), options, training=False)
    _, training = F.forward(x, inference.weights, options, training=True)
    want, _ = F.forward(x, training.weights, options, training=False)
    del inference
    # Reuse the freed memory (snapshots of as many vectors take blocks of its size), so that a
    # vector read from it would show.
    nan = F.Weights(**{k: np.full(3, np.nan, np.float32) for k in options.weight_names()})
    garbage = [nan.snapshot(["gamma", "moving_mean", "moving_variance"]) for _ in range(64)]
    got, _ = F.forward(x, training.weights, options, training=False)
    np.testing.assert_array_equal(got, want)
    # The moving statistics were updated in the copies: mean halfway to the batch mean.
    reference = (x - 0.5 * x.mean(0)) / np.sqrt(0.5 + 0.5 * x.var(0) + options.epsilon)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    del garbage


@pytest.mark.parametrize("training", [True, False])
def test_forward_into_out_is_bitwise_the_call_without_it(training: bool) -> None:
    x = np.random.default_rng(6).normal(size=(12, 5)).astype(np.float32)
    options = F.Options(momentum=0.5)
    without, into = F.initial_weights(options, [12, 5]), F.initial_weights(options, [12, 5])
    for out in (np.empty_like(x), np.empty((12, 10), np.float32)[:, ::2]):
        expected, _ = F.forward(x, without, options, training=training)
        y, _ = F.forward(x, into, options, training=training, out=out)
        assert y is out
        assert out.tobytes() == np.ascontiguousarray(expected).tobytes()
        for name in without:  # the same moving-statistics update, step after step
            assert without[name].tobytes() == into[name].tobytes()
    assert training == (without["moving_mean"] != 0).any()


def test_the_plain_numpy_call_falls_back_where_it_does_not_apply() -> None:
    """The one-call NumPy path declines dy of another dtype, bfloat16 data and a misaligned
    input; the general path then casts dy, reads bfloat16 as such, and refuses the misaligned
    input (the layer copies it first) as before."""
    import ml_dtypes

    options = F.Options()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for training in (True, False):
        weights = F.Weights(**F.initial_weights(options, x.shape))
        y, context = F.forward(x, weights, options, training=training)
        dx, dgamma, dbeta = F.backward(dy, context)
        cast = F.backward(dy.astype(np.float64), context)  # cast to x's dtype first
        for got, want in zip(cast, (dx, dgamma, dbeta)):
            np.testing.assert_array_equal(got, want)
        raw = np.empty(x.nbytes + 1, np.uint8)
        shifted = raw[1:].view(np.float32).reshape(x.shape)
        shifted[...] = x
        assert not shifted.flags.aligned
        weights = F.Weights(**F.initial_weights(options, x.shape))
        with pytest.raises(ValueError, match="not aligned to its 4-byte elements"):
            F.forward(shifted, weights, options, training=training)
        y_bf16, _ = F.forward(x.astype(ml_dtypes.bfloat16), weights, options, training=training)
        assert y_bf16.dtype == ml_dtypes.bfloat16
        np.testing.assert_allclose(y_bf16.astype(np.float32), y, rtol=0.02, atol=0.05)
    with pytest.raises(ValueError, match=r"dy: expected shape \(16, 4\)"):
        F.backward(dy[:8], context)
    with pytest.raises(TypeError, match="dy: dtype complex64 is not a real number type"):
        F.backward(dy.astype(np.complex64), context)


def test_absent_weights_may_be_none_or_missing() -> None:
    """gamma/beta left out, or given as None, give no gradient for them in either mode."""
    options = F.Options(center=False, scale=False)
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(16, 4))
    for weights in (
        F.initial_weights(options, x.shape, dtype="float64"),
        {**F.initial_weights(options, x.shape, dtype="float64"), "gamma": None, "beta": None},
    ):
        for training in (True, False):
            y, context = F.forward(x, weights, options, training=training)
            dx, dgamma, dbeta = F.backward(np.ones_like(x), context)
            assert dgamma is None and dbeta is None
            if training:  # dx of a normalization without gamma sums to zero per feature
                np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-12)
            else:  # dy / sqrt(moving_variance + epsilon), the training call having moved it
                want = 1.0 / np.sqrt(weights["moving_variance"] + 1e-3)
                np.testing.assert_allclose(dx, np.broadcast_to(want, dx.shape), rtol=1e-12)
            assert y.shape == dx.shape == x.shape


def test_input_shape_for_places_the_feature_sizes_on_the_feature_axes() -> None:
    assert F.Options(axis=1).input_shape_for((5,)) == [1, 5]
    assert F.Options(axis=-1).input_shape_for((5,)) == [5]
    assert F.Options(axis=[3, 1]).input_shape_for((4, 6)) == [1, 4, 1, 6]
    assert F.Options(axis=[-1, -3]).input_shape_for((2, 3)) == [2, 1, 3]
    schema = F.Options(axis=[3, 1]).schema([1, 4, 1, 6])
    assert tuple(schema.feature_shape) == (4, 6)  # the order input_shape_for takes
    with pytest.raises(ValueError, match="2 feature axes"):
        F.Options(axis=[1, 2]).input_shape_for((3,))


@pytest.mark.torch
def test_weights_of_another_framework_are_bound_through_dlpack() -> None:
    """PyTorch weights once got "the input is on cpu but the weights are on cpu" (found by the
    leak test's training script); bound through DLPack they work as NumPy ones do (what
    batchnorm.torch relies on), the moving statistics updated in place."""
    torch = pytest.importorskip("torch")
    options = F.Options(axis=1)
    start = F.initial_weights(options, (4, 3, 5))
    tensors = {k: torch.from_numpy(v.copy()) for k, v in start.items()}
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    y_torch, _ = F.forward(torch.from_numpy(x), tensors, options, training=True)
    y_numpy, _ = F.forward(x, start, options, training=True)
    np.testing.assert_array_equal(y_torch.numpy(), y_numpy)
    np.testing.assert_array_equal(tensors["moving_mean"].numpy(), start["moving_mean"])


def test_a_context_rebuilt_from_packed_statistics_differentiates_its_call() -> None:
    """What the PyTorch and JAX adapters keep of a training call: its packed statistics."""
    options = F.Options(axis=1, virtual_batch_size=2)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3, 5))
    mask = rng.random((4, 1, 5)) > 0.3
    weights = F.initial_weights(options, x.shape, dtype="float64")
    weights["gamma"][:] = [0.5, 2.0, -1.0]
    _, context = F.forward(x, weights, options, training=True, mask=mask)
    packed = context.statistics.pack()
    assert packed.shape == (F.packed_size(options, x.shape),) == (2 * 3 * 3 + 2 * 3,)
    rebuilt = F.training_context(x, mask, weights, options, packed)
    dy = rng.normal(size=x.shape)
    for want, got in zip(F.backward(dy, context), F.backward(dy, rebuilt)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="do not fit"):
        F.training_context(x, mask, weights, options, packed[:-1])
