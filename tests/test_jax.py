"""batchnorm.jax: the pure function under jit, grad and vmap against the float64 reference (masks,
renorm, ghost batches, adjustment, frozen inference), its errors, the Flax NNX module (Keras'
names and weights), and a small Flax CNN trained with optax equal to the same model with a
pure-JAX reference batch norm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import batchnorm

from reference import ReferenceBN

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
bnj = pytest.importorskip("batchnorm.jax")

pytestmark = pytest.mark.jax

# The pure_callback route is in every build; the XLA FFI route where the handlers were built
# (BATCHNORM_BUILD_JAX_FFI).
ROUTES = ["callback"] + (["ffi"] if bnj.ffi_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _float64() -> object:
    """float64 data (and the float64 kernels) need JAX's x64 mode, for this module only."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _reference_call(config, x, weights, *, training, mask=None, dy=None):  # noqa: ANN001, ANN202
    """y, the weights after the call and (dx, dgamma, dbeta) of the float64 reference."""
    adjustment = config.pop("adjustment", None)
    ref = ReferenceBN(**config, adjustment=None if adjustment is None else lambda _: adjustment)
    ref.build(x.shape)
    ref.set_weights(weights)
    y = ref.forward(x, training=training, mask=mask)
    return y, ref.get_weights(), None if dy is None else ref.backward(dy)


def _split(names, weights):  # noqa: ANN001, ANN202
    values = dict(zip(names, (jnp.asarray(w) for w in weights)))
    params = {k: values.pop(k) for k in ("gamma", "beta") if k in values}
    return params, values


def _random_weights(names, features, rng):  # noqa: ANN001, ANN202
    start = {"gamma": 1.0, "moving_variance": 1.0, "moving_stddev": 1.0, "renorm_stddev": 1.0}
    return [start.get(n, 0.0) + 0.3 * rng.random(features) for n in names]


CASES = {
    "plain": ({"axis": -1}, (16, 5), None),
    "nchw-masked": ({"axis": 1, "momentum": 0.9}, (6, 3, 4, 5), (6, 3, 4)),
    "per-pixel-mask": ({"axis": 1}, (6, 3, 4, 5), (6, 1, 4, 5)),
    "renorm": (
        {"renorm": True, "renorm_clipping": {"rmax": 1.2, "rmin": 0.8, "dmax": 0.1}},
        (12, 4),
        None,
    ),
    "ghost-masked": ({"axis": -1, "virtual_batch_size": 4}, (12, 3, 4), (12, 3)),
    "no-gamma-beta": ({"axis": [1, 2], "center": False, "scale": False}, (8, 3, 2), None),
    "adjustment": ({"axis": -1, "adjustment": (1.5, -0.25)}, (10, 4), None),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_matches_the_reference(case: str, jit: bool, route: str) -> None:
    config, shape, mask_shape = CASES[case]
    config = dict(config)
    rng = np.random.default_rng(len(case))
    x = rng.normal(1.0, 2.0, shape)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    dy = rng.normal(size=shape)
    options = batchnorm.functional.Options(**{k: v for k, v in config.items() if k != "adjustment"})
    names = options.weight_names()
    features = options.schema(shape).features
    weights = _random_weights(names, features, rng)
    expected_y, expected_weights, expected_grads = _reference_call(
        dict(config), x, [w.reshape(-1) for w in weights], training=True, mask=mask, dy=dy
    )
    params, state = _split(names, weights)
    adjustment = config.pop("adjustment", None)

    def loss(x, params):  # noqa: ANN001, ANN202
        y, new_state = bnj.batch_norm(
            x, params, state, training=True, mask=mask, adjustment=adjustment, route=route, **config
        )
        return jnp.sum(y * dy), (y, new_state)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    if jit:
        grad = jax.jit(grad)
    (dx, dparams), (y, new_state) = grad(jnp.asarray(x), params)

    np.testing.assert_allclose(y, expected_y, rtol=1e-10, atol=1e-12)
    got = {**dparams, **new_state}
    for name, value in zip(names, expected_weights):
        if name not in ("gamma", "beta"):
            np.testing.assert_allclose(got[name], value.reshape(-1), rtol=1e-10, err_msg=name)
    ref_dx, ref_dgamma, ref_dbeta = expected_grads
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-9, atol=1e-11)
    for name, value in (("gamma", ref_dgamma), ("beta", ref_dbeta)):
        assert (name in dparams) == (value is not None)
        if value is not None:
            np.testing.assert_allclose(dparams[name], value.reshape(-1), rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_frozen_inference_uses_and_keeps_the_moving_statistics(jit: bool, route: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 5))
    dy = rng.normal(size=x.shape)
    names = ["gamma", "beta", "moving_mean", "moving_variance"]
    weights = _random_weights(names, 3, rng)
    expected_y, _, (ref_dx, ref_dgamma, ref_dbeta) = _reference_call(
        {"axis": 1}, x, weights, training=False, dy=dy
    )
    params, state = _split(names, weights)

    def loss(x, params):  # noqa: ANN001, ANN202
        y, new_state = bnj.batch_norm(x, params, state, training=False, axis=1, route=route)
        return jnp.sum(y * dy), new_state

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if jit:
        value_and_grad = jax.jit(value_and_grad)
    (value, new_state), (dx, dparams) = value_and_grad(jnp.asarray(x), params)
    np.testing.assert_allclose(value, np.sum(expected_y * dy), rtol=1e-10)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(new_state[name], state[name])
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-10)
    np.testing.assert_allclose(dparams["gamma"], ref_dgamma, rtol=1e-10)
    np.testing.assert_allclose(dparams["beta"], ref_dbeta, rtol=1e-10)


@pytest.mark.parametrize("route", ROUTES)
def test_vmap_normalizes_each_member_on_its_own(route: str) -> None:
    rng = np.random.default_rng(4)
    xs = rng.normal(size=(3, 8, 2)) * np.array([1.0, 5.0, 0.1])[:, None, None]
    dys = rng.normal(size=xs.shape)
    params = {"gamma": jnp.array([1.5, 0.5]), "beta": jnp.array([0.1, -0.2])}
    state = {"moving_mean": jnp.zeros(2), "moving_variance": jnp.ones(2)}

    def member(x, dy, params):  # noqa: ANN001, ANN202
        def loss(x, params):  # noqa: ANN001, ANN202
            y, new_state = bnj.batch_norm(
                x, params, state, training=True, momentum=0.5, route=route
            )
            return jnp.sum(y * dy), (y, new_state)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)

    batched = jax.jit(jax.vmap(member, in_axes=(0, 0, None)))
    (dx, dparams), (y, new_state) = batched(jnp.asarray(xs), jnp.asarray(dys), params)
    assert y.shape == xs.shape and new_state["moving_mean"].shape == (3, 2)
    for i in range(3):
        weights = [np.asarray(params["gamma"]), np.asarray(params["beta"]), np.zeros(2), np.ones(2)]
        ref_y, ref_weights, (ref_dx, ref_dgamma, ref_dbeta) = _reference_call(
            {"momentum": 0.5}, xs[i], weights, training=True, dy=dys[i]
        )
        np.testing.assert_allclose(y[i], ref_y, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(new_state["moving_variance"][i], ref_weights[3], rtol=1e-10)
        np.testing.assert_allclose(dx[i], ref_dx, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(dparams["gamma"][i], ref_dgamma, rtol=1e-9)
        np.testing.assert_allclose(dparams["beta"][i], ref_dbeta, rtol=1e-9)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_low_precision_inputs_keep_their_dtype(dtype: str, route: str) -> None:
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(32, 4)), dtype=dtype)
    f32 = jnp.float32
    params = {"gamma": jnp.ones(4, f32), "beta": jnp.zeros(4, f32)}
    state = {"moving_mean": jnp.zeros(4, f32), "moving_variance": jnp.ones(4, f32)}
    step = jax.jit(bnj.batch_norm, static_argnames=("training", "route"))
    y, new_state = step(x, params, state, training=True, route=route)
    assert y.dtype == x.dtype and new_state["moving_mean"].dtype == jnp.float32
    dx, dgamma = jax.jit(
        jax.grad(
            lambda x, p: (
                bnj.batch_norm(x, p, state, training=True, route=route)[0].astype(f32)[0].sum()
            ),
            argnums=(0, 1),
        )
    )(x, params)
    assert dx.dtype == x.dtype and dgamma["gamma"].dtype == jnp.float32
    expected, _, _ = _reference_call(
        {},
        np.asarray(x, np.float64),
        [np.ones(4), np.zeros(4)] + [np.zeros(4), np.ones(4)],
        training=True,
    )
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=tolerance, atol=tolerance)


def test_keras_weight_shapes_come_back_as_given() -> None:
    params = {"gamma": jnp.ones((1, 3, 1)), "beta": jnp.zeros((1, 3, 1))}
    state = {"moving_mean": jnp.zeros((1, 3, 1)), "moving_variance": jnp.ones((1, 3, 1))}
    x = jnp.arange(24.0).reshape(4, 3, 2)
    _, new_state = bnj.batch_norm(x, params, state, training=True, axis=1)
    assert new_state["moving_mean"].shape == (1, 3, 1)
    np.testing.assert_allclose(new_state["moving_mean"].reshape(-1), 0.01 * x.mean(axis=(0, 2)))


def test_errors_are_clear() -> None:
    x = jnp.ones((4, 3))
    params = {"gamma": jnp.ones(3), "beta": jnp.zeros(3)}
    state = {"moving_mean": jnp.zeros(3), "moving_variance": jnp.ones(3)}
    with pytest.raises(ValueError, match="gamma is missing"):
        bnj.batch_norm(x, {"beta": jnp.zeros(3)}, state, training=True)
    with pytest.raises(ValueError, match="center=False has no beta"):
        bnj.batch_norm(x, params, state, training=True, center=False)
    with pytest.raises(ValueError, match=r"expected 3 values, got shape \(4,\)"):
        bnj.batch_norm(x, params, {**state, "moving_mean": jnp.zeros(4)}, training=True)
    with pytest.raises(ValueError, match=r"missing \['moving_stddev'"):
        bnj.batch_norm(x, params, state, training=True, renorm=True)
    with pytest.raises(ValueError, match="mask: shape"):
        bnj.batch_norm(x, params, state, training=True, mask=jnp.ones((3,), bool))
    with pytest.raises(ValueError, match="values must be booleans or 0/1"):
        bnj.batch_norm(x, params, state, training=True, mask=jnp.full((4,), 0.5))
    with pytest.raises(ValueError, match="route must be one of"):
        bnj.batch_norm(x, params, state, training=True, route="fast")
    with pytest.raises(ValueError, match="must divide the batch size"):
        bnj.batch_norm(x, params, state, training=True, virtual_batch_size=3)
    with pytest.raises(TypeError, match="training must be a Python bool"):
        jax.jit(lambda t: bnj.batch_norm(x, params, state, training=t))(True)
    with pytest.raises(TypeError, match="floating-point"):
        bnj.batch_norm(jnp.ones((4, 3), jnp.int32), params, state, training=True)
    with pytest.raises(TypeError, match="unknown options"):
        bnj.batch_norm(x, params, state, training=True, colour=1)
    layer = batchnorm.BatchNormalization()
    with pytest.raises(TypeError, match=r"tracer.*batchnorm\.jax"):
        jax.jit(lambda x: layer(x, training=True))(x)
    with pytest.raises(TypeError, match=r"tracer.*batchnorm\.jax"):
        jax.grad(lambda x: layer(x, training=True).sum())(x)


def test_eager_layer_takes_jax_arrays_of_its_own_dtype() -> None:
    layer = batchnorm.BatchNormalization()
    x = np.random.default_rng(8).normal(size=(6, 3)).astype(np.float32)
    y = layer(jnp.asarray(x), training=True)  # float32 data in a float32 layer: no cast
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32
    expected, _, _ = _reference_call(
        {},
        x.astype(np.float64),
        [np.ones(3), np.zeros(3)] + [np.zeros(3), np.ones(3)],
        training=True,
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_imports_without_jax() -> None:
    code = (
        "import sys; sys.modules['jax'] = None; import batchnorm, numpy as np; "
        "print(batchnorm.BatchNormalization()(np.ones((2, 3), np.float32)).shape)\n"
        "try:\n    import batchnorm.jax\nexcept ImportError: print('no jax')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["(2,", "3)", "no", "jax"]


def test_xla_handlers_built_against_the_installed_package(tmp_path: Path) -> None:
    """The FFI route as a user of a build without it gets it: the handlers compiled against the
    C++ package inside the installed wheel and jaxlib's FFI headers, named by
    BATCHNORM_JAX_FFI_LIBRARY; this module's route tests then run on them."""
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.fail("no C++ compiler (c++) on PATH")
    package = Path(batchnorm.__file__).parent
    library = tmp_path / "_jax_ffi.so"
    source = Path(__file__).resolve().parent.parent / "python" / "src" / "jax_ffi.cpp"
    command = [compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-isystem"]
    command += [jax.ffi.include_dir(), f"-I{package / 'include'}", str(source), "-o", str(library)]
    command += [f"-L{package / 'lib'}", "-lbatchnorm", f"-Wl,-rpath,{package / 'lib'}"]
    subprocess.run(command, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "ffi"],
        env={**os.environ, "BATCHNORM_JAX_FFI_LIBRARY": str(library)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    passed = int(result.stdout.rsplit(" passed", 1)[0].split()[-1])
    assert passed == 2 * len(CASES) + 2 + 1 + 3, result.stdout[-2000:]  # every ffi test


# ---- the Flax module ---------------------------------------------------------------------------

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")


def test_module_has_keras_names_and_loads_keras_weights() -> None:
    keras = batchnorm.BatchNormalization(axis=1, momentum=0.8, renorm=True)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(6, 3, 4)).astype(np.float32)
    keras(x, training=True)
    module = bnj.BatchNormalization.from_keras(keras)
    assert module.names == tuple(keras.options.weight_names())
    assert isinstance(module.gamma, nnx.Param) and isinstance(module.moving_mean, nnx.BatchStat)
    for ours, theirs in zip(module.get_weights(), keras.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    # The same call on both: equal outputs and moving statistics.
    expected = keras(x, training=True)
    y = nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(module.get_weights(), keras.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    module.eval()
    before = module.get_weights()
    np.testing.assert_allclose(module(jnp.asarray(x)), keras(x), rtol=1e-6, atol=1e-6)
    for a, b in zip(before, module.get_weights()):
        np.testing.assert_array_equal(a, b)
    # From a config and a weight list (Keras' get_weights order).
    weights = [w * 2 + 1 for w in keras.get_weights()]
    loaded = bnj.BatchNormalization.from_keras(keras.get_config(), weights)
    assert loaded.get_config()["momentum"] == 0.8
    for ours, theirs in zip(loaded.get_weights(), weights):
        np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="expected 7 weights"):
        loaded.set_weights(weights[:2])
    with pytest.raises(ValueError, match="not applied by the Flax module"):
        bnj.BatchNormalization(3, gamma_regularizer="l2")


class _ReferenceBN(nnx.Module):
    """Keras' training batch norm over the last axis in plain JAX (the test's oracle)."""

    def __init__(self, features: int) -> None:
        self.gamma = nnx.Param(jnp.ones(features))
        self.beta = nnx.Param(jnp.zeros(features))
        self.moving_mean = nnx.BatchStat(jnp.zeros(features))
        self.moving_variance = nnx.BatchStat(jnp.ones(features))

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = x.mean(axes)
        variance = ((x - mean) ** 2).mean(axes)
        self.moving_mean[...] = 0.99 * self.moving_mean[...] + 0.01 * mean
        self.moving_variance[...] = 0.99 * self.moving_variance[...] + 0.01 * variance
        return (x - mean) / jnp.sqrt(variance + 1e-3) * self.gamma[...] + self.beta[...]


class _CNN(nnx.Module):
    def __init__(self, norm: type, rngs: nnx.Rngs) -> None:
        f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": rngs}
        self.conv1 = nnx.Conv(1, 4, (3, 3), use_bias=False, **f64)  # (the norm centers)
        self.norm1 = norm(4)
        self.conv2 = nnx.Conv(4, 6, (3, 3), use_bias=False, **f64)
        self.norm2 = norm(6)
        self.head = nnx.Linear(6, 2, **f64)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm1(self.conv1(x)))
        x = nnx.relu(self.norm2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


def test_flax_cnn_trains_like_the_reference() -> None:
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 1)))
    target = jnp.asarray(rng.normal(size=(8, 2)))

    def train(norm: type) -> tuple[list[float], _CNN]:
        model = _CNN(norm, nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

        @nnx.jit
        def step(model: _CNN, optimizer: nnx.Optimizer) -> jax.Array:
            def loss(model: _CNN) -> jax.Array:
                return jnp.mean((model(x) - target) ** 2)

            value, grads = nnx.value_and_grad(loss)(model)
            optimizer.update(model, grads)
            return value

        return [float(step(model, optimizer)) for _ in range(20)], model

    def ours(features: int) -> nnx.Module:
        return bnj.BatchNormalization(features, param_dtype=jnp.float64)

    losses, model = train(ours)
    expected_losses, expected = train(_ReferenceBN)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-9)
    assert losses[-1] < 0.5 * losses[0]  # it trained
    leaves = jax.tree_util.tree_leaves(nnx.state(model))
    expected_leaves = jax.tree_util.tree_leaves(nnx.state(expected))
    assert len(leaves) == len(expected_leaves)
    for a, b in zip(leaves, expected_leaves):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
