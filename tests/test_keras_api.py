"""The parts of Keras' layer API that Keras code calls: apply_gradients without parameters,
set_weights on an unbuilt layer and get/set round trips, supports_masking and the variable
lists, `.constraint`/`.regularizer` on weights, the `training` argument's type, weights before
build, `from_config` with `build_config` or a whole serialized entry, and
`serialize`/`deserialize` of layer entries (ours, and those of real tf.keras 2 / Keras 3 model
configs recorded by tests/keras_reference/record_models.py)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest

import batchnorm

BN = batchnorm.BatchNormalization
HERE = pathlib.Path(__file__).resolve().parent / "keras_reference"
CONFIGS = json.loads((HERE / "configs.json").read_text())
MODELS = HERE / "models"
RECORDED = {
    name: json.loads((MODELS / f"{name}.expected.json").read_text())["layers"]
    for name in ("k3_model", "k2_model", "k3_dtypes")
}


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(2.0, 3.0, size=shape).astype(np.float32)


def _same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# ---- apply_gradients, set_weights -------------------------------------------------------------


def test_apply_gradients_without_gamma_and_beta_is_a_noop() -> None:
    layer = BN(center=False, scale=False)
    x = _x((8, 3))
    layer(x, training=True)
    layer.backward(np.ones_like(x))
    assert layer.gradients == {}
    before = layer.get_weights()
    layer.apply_gradients(0.1)  # nothing to update: no "needs a backward call first"
    _same_weights(before, layer.get_weights())
    # Layers with parameters still need the gradients of a backward call.
    with pytest.raises(ValueError, match="backward"):
        BN(center=False).apply_gradients(0.1)


def test_set_weights_empty_list_on_an_unbuilt_layer() -> None:
    layer = BN()
    layer.set_weights([])
    layer.set_weights(layer.get_weights())
    assert not layer.built and layer.get_weights() == []
    with pytest.raises(ValueError, match="build the layer"):
        layer.set_weights([np.ones(3)])
    assert not layer.built


STATES = {
    "default": ({}, (6, 4)),
    "renorm": ({"renorm": True, "renorm_clipping": {"rmax": 2.0}}, (6, 5, 3)),
    "no_center": ({"center": False}, (6, 4)),
    "no_scale": ({"scale": False}, (6, 4)),
    "no_center_no_scale": ({"center": False, "scale": False}, (6, 4)),
    "frozen": ({"trainable": False}, (6, 4)),
    "float64_nchw": ({"dtype": "float64", "axis": 1}, (4, 3, 2, 2)),
    "axis_list": ({"axis": [1, 3]}, (2, 3, 4, 5)),
    "ghost": ({"virtual_batch_size": 2}, (6, 4)),
    "mixed_bfloat16": ({"dtype": "mixed_bfloat16"}, (6, 4)),
}


@pytest.mark.parametrize("name", sorted(STATES))
def test_get_set_weights_round_trip_in_every_state(name: str) -> None:
    config, shape = STATES[name]
    rng = np.random.default_rng(1)
    unbuilt = BN(**config)
    unbuilt.set_weights(unbuilt.get_weights())
    assert not unbuilt.built

    layer = BN(**config)
    layer.build(shape)
    layer.set_weights(layer.get_weights())  # freshly built
    random = [rng.uniform(0.5, 2.0, w.shape).astype(w.dtype) for w in layer.get_weights()]
    layer.set_weights(random)
    _same_weights(layer.get_weights(), random)
    x = _x(shape)
    if layer.trainable:
        layer(x, training=True)  # after a training step
        layer.backward(np.ones_like(x))
        layer.apply_gradients(0.1)
    trained = layer.get_weights()
    assert layer.trainable is False or any(
        not np.array_equal(a, b) for a, b in zip(trained, random)
    )
    layer.set_weights(trained)
    _same_weights(layer.get_weights(), trained)
    clone = BN.from_config(batchnorm.serialize(layer))
    clone.set_weights(trained)
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(layer(x)))


# ---- attributes Keras code reads ---------------------------------------------------------------


def test_supports_masking_and_variable_lists() -> None:
    layer = BN(renorm=True)
    assert layer.supports_masking is True and BN.supports_masking is True
    assert layer.trainable_variables == [] and layer.non_trainable_variables == []
    layer.build((None, 3))
    assert [v.name for v in layer.trainable_variables] == ["gamma", "beta"]
    assert [v.name for v in layer.non_trainable_variables] == [
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    ]
    layer.trainable = False
    assert layer.trainable_variables == []
    assert len(layer.non_trainable_variables) == 7


def test_weight_constraint_and_regularizer() -> None:
    layer = BN(gamma_constraint="non_neg", beta_regularizer="l1", gamma_regularizer="l2")
    layer.build((None, 3))
    assert isinstance(layer.gamma.constraint, batchnorm.constraints.NonNeg)
    assert layer.gamma.constraint is layer.gamma_constraint
    assert layer.beta.constraint is None
    assert isinstance(layer.gamma.regularizer, batchnorm.regularizers.L2)
    assert isinstance(layer.beta.regularizer, batchnorm.regularizers.L1)
    assert layer.moving_mean.constraint is None and layer.moving_variance.regularizer is None
    # Read live from the layer, which is what apply_gradients applies.
    layer.gamma_constraint = batchnorm.constraints.MaxNorm(2.0)
    assert layer.gamma.constraint is layer.gamma_constraint
    gamma = layer.gamma
    del layer
    assert gamma.constraint is None  # a weight does not keep its layer alive


def test_weights_before_build_say_the_layer_is_not_built() -> None:
    layer = BN(name="bn_early")
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        with pytest.raises(AttributeError, match="bn_early: the layer is not built yet"):
            getattr(layer, name)
    assert not hasattr(layer, "gamma")
    layer = BN(center=False, scale=False)
    layer.build((None, 3))
    assert layer.gamma is None and layer.beta is None  # as Keras with scale/center False
    with pytest.raises(AttributeError, match="moving_stddev") as error:
        layer.moving_stddev  # noqa: B018 - no renorm: no such weight
    assert "not built" not in str(error.value)


@pytest.mark.parametrize("training", ["False", "true", 0, 1, 1.0, [True], np.array(True)])
def test_training_must_be_a_bool_or_none(training: Any) -> None:
    layer = BN(momentum=0.5)
    x = _x((8, 3))
    layer(x, training=True)
    before = layer.get_weights()
    with pytest.raises(TypeError, match="training must be True, False or None"):
        layer(x, training=training)
    _same_weights(before, layer.get_weights())
    fresh = BN()
    with pytest.raises(TypeError, match="training"):
        fresh(x, training=training)
    assert not fresh.built


def test_training_accepts_bools_and_none() -> None:
    x = _x((8, 3))
    layer = BN(momentum=0.5)
    y_none = layer(x, training=None)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), np.asarray(y_none))
    layer(x, training=np.bool_(True))
    assert not np.array_equal(layer.moving_mean.numpy(), np.zeros(3, np.float32))


# ---- from_config -------------------------------------------------------------------------------


def test_from_config_builds_from_build_config() -> None:
    config = dict(RECORDED["k3_model"][1]["config"])
    layer = BN.from_config({**config, "build_config": {"input_shape": [None, 4, 4, 5]}})
    assert layer.built and layer.moving_mean.shape == (5,)
    layer.set_weights([np.full(5, v, np.float32) for v in (1, 2, 3, 4, 5, 6, 7)])
    assert layer.renorm_stddev.numpy()[0] == 7
    unbuilt = BN.from_config({**config, "build_config": {"input_shape": None}})
    assert not unbuilt.built


def test_from_config_accepts_a_whole_serialized_entry() -> None:
    entry = RECORDED["k3_model"][0]["entry"]
    layer = BN.from_config(entry)
    assert layer.name == "bn_axis1" and layer.built and layer.axis == 1
    assert layer.moving_mean.shape == (3,)


@pytest.mark.parametrize(
    "config,error,words",
    [
        ({"module": "keras.layers", "axis": 1}, TypeError, "'module'.*deserialize"),
        ({"axis": 1, "units": 3}, TypeError, "'units'"),
        ({"build_config": {"input_shape": [None, "3"]}}, ValueError, "input_shape"),
        ({"build_config": {"shapes": [None, 3]}}, ValueError, "build_config"),
        ({"build_config": [None, 3]}, TypeError, "build_config"),
        ({"axis": 2, "build_config": {"input_shape": [None, 3]}}, ValueError, "axis 2"),
        ([("axis", 1)], TypeError, "dict"),
    ],
)
def test_from_config_errors(config: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        BN.from_config(config)


# ---- serialize / deserialize --------------------------------------------------------------------


def test_serialize_deserialize_round_trip() -> None:
    layer = BN(
        axis=1,
        momentum=0.9,
        center=False,
        renorm=True,
        renorm_clipping={"rmax": 2.0, "dmax": 1.0},
        gamma_regularizer="l2",
        gamma_constraint="non_neg",
        name="bn_round_trip",
    )
    entry = batchnorm.serialize(layer)
    assert set(entry) == {"module", "class_name", "config", "registered_name"}  # not built
    assert (entry["module"], entry["class_name"], entry["registered_name"]) == (
        "keras.layers",
        "BatchNormalization",
        None,
    )
    assert not batchnorm.deserialize(entry).built

    x = _x((4, 3, 5))
    layer(x, training=True)
    entry = json.loads(json.dumps(batchnorm.serialize(layer)))  # plain JSON
    assert entry["build_config"] == {"input_shape": [4, 3, 5]}
    clone = batchnorm.deserialize(entry)
    assert clone.built and clone.get_config() == layer.get_config()
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(layer(x)))
    # Keras 3's layer rejects tf.keras-only keys: left out at their defaults, kept otherwise.
    assert "fused" not in entry["config"] and "virtual_batch_size" not in entry["config"]
    ghost = batchnorm.serialize(BN(virtual_batch_size=2, fused=False))
    assert ghost["config"]["virtual_batch_size"] == 2 and ghost["config"]["fused"] is False


def test_serialize_writes_keras3_keys() -> None:
    keras3 = RECORDED["k3_model"][1]["entry"]  # written by keras.saving.serialize_keras_object
    ours = batchnorm.serialize(BN.from_config(keras3["config"]))
    assert set(ours) == set(keras3) - {"build_config"}
    assert set(ours["config"]) == set(keras3["config"])
    for key in ("module", "class_name", "registered_name"):
        assert ours[key] == keras3[key]


@pytest.mark.parametrize(
    "model,index",
    [(m, i) for m in sorted(RECORDED) for i in range(len(RECORDED[m]))],
)
def test_deserialize_recorded_keras_entries(model: str, index: int) -> None:
    recorded = RECORDED[model][index]
    entry, config = recorded["entry"], recorded["config"]
    layer = batchnorm.deserialize(entry)
    assert layer.name == recorded["name"]
    assert layer.built
    assert layer._build_input_shape == (None, *recorded["input_shape"][1:])
    for key in ("center", "scale", "renorm", "trainable"):
        assert getattr(layer, key) == config.get(key, False if key == "renorm" else True), key
    assert layer.epsilon == pytest.approx(config["epsilon"])
    assert layer.momentum == pytest.approx(config["momentum"])
    assert [w.name for w in layer.weights] == recorded["weight_names"]
    for key in ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint"):
        ours = layer.get_config()[key]
        if config[key] is None:
            assert ours is None, key
        else:
            assert ours["class_name"] == config[key]["class_name"], key


def test_deserialize_model_config_entries() -> None:
    # Entries of a model config carry "name" and "inbound_nodes" as well.
    model = json.loads((MODELS / "k3_model.config.json").read_text())
    entries = [e for e in model["config"]["layers"] if e["class_name"] == "BatchNormalization"]
    layers = [batchnorm.deserialize(e) for e in entries]
    assert [layer.name for layer in layers] == [r["name"] for r in RECORDED["k3_model"][:4]]
    assert all(layer.built for layer in layers)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_deserialize_configs_json_as_entries(key: str) -> None:
    config = CONFIGS[key]
    layer = batchnorm.deserialize({"class_name": "BatchNormalization", "config": config})
    assert layer.name == config["name"] and not layer.built
    assert layer.get_config() == BN.from_config(config).get_config()


def test_deserialize_sync_batch_normalization() -> None:
    layer = batchnorm.deserialize({"class_name": "SyncBatchNormalization", "config": {}})
    assert layer.synchronized is True


@pytest.mark.parametrize(
    "entry,error,words",
    [
        ("BatchNormalization", TypeError, "dict"),
        ({"axis": 1}, ValueError, "from_config"),
        ({"class_name": "Dense", "config": {"units": 3}}, ValueError, "'Dense'"),
        (
            {"class_name": "BatchNormalization", "config": {}, "registered_name": "my>BN"},
            ValueError,
            "custom",
        ),
        ({"class_name": "BatchNormalization", "config": [1]}, TypeError, "config"),
        (
            {"class_name": "BatchNormalization", "config": {}, "build_config": {"x": 1}},
            ValueError,
            "build_config",
        ),
    ],
)
def test_deserialize_errors(entry: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        batchnorm.deserialize(entry)


def test_serialize_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="BatchNormalization"):
        batchnorm.serialize({"class_name": "BatchNormalization"})  # type: ignore[arg-type]
