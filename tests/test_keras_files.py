"""`batchnorm.load_keras` on real saved models: Keras 3.15 (`.keras`, `.weights.h5`, legacy
`.h5`) and tf-keras 2.21 (`.h5`, `save_weights` `.h5`, `.keras`) files recorded by
tests/keras_reference/record_models.py, with the weights, configs and inference outputs Keras
gave for each BatchNormalization layer."""

from __future__ import annotations

import json
import pathlib
import sys
import zipfile
from typing import Any

import numpy as np
import pytest

import batchnorm

h5py = pytest.importorskip("h5py")  # the "keras" extra; part of the "test" extra

MODELS = pathlib.Path(__file__).resolve().parent / "keras_reference" / "models"

# (file, config= argument, expected facts)
FILES = [
    ("k3_model.keras", None, "k3_model"),
    ("k3_model_legacy.h5", None, "k3_model"),
    ("k3_model.weights.h5", "k3_model.keras", "k3_model"),
    ("k3_model.weights.h5", "k3_model.config.json", "k3_model"),
    ("k2_model.h5", None, "k2_model"),
    ("k2_model.keras", None, "k2_model"),
    ("k2_model_weights.h5", "k2_model.config.json", "k2_model"),
    ("k2_model.h5", "k2_model.config.json", "k2_model"),
    ("k3_dtypes.keras", None, "k3_dtypes"),
]
OBJECT_KEYS = ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint")


def _expected(name: str) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    meta = json.loads((MODELS / f"{name}.expected.json").read_text())
    with np.load(MODELS / f"{name}.expected.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return meta["layers"], arrays


def _same_object(what: str, ours: Any, keras: Any) -> None:
    if keras is None:
        assert ours is None, what
        return
    assert ours["class_name"] == keras["class_name"], what
    for key, value in keras["config"].items():
        assert ours["config"][key] == pytest.approx(value, rel=1e-6), f"{what}.{key}"


@pytest.mark.parametrize(
    "filename,config,expected", FILES, ids=[f"{f}-{c or 'own config'}" for f, c, _ in FILES]
)
def test_load_keras_matches_keras(filename: str, config: str | None, expected: str) -> None:
    recorded, arrays = _expected(expected)
    layers = batchnorm.load_keras(
        MODELS / filename, config=None if config is None else MODELS / config
    )
    assert [layer.name for layer in layers] == [r["name"] for r in recorded]
    for i, (layer, facts) in enumerate(zip(layers, recorded)):
        keras_config = facts["config"]
        where = f"{filename}: {layer.name}"
        assert layer.built, where
        assert [w.name for w in layer.weights] == facts["weight_names"], where
        # The weights are exactly the saved ones (16-bit values widened exactly).
        for j, weight in enumerate(layer.get_weights()):
            ref = arrays[f"{i}_w{j}"]
            assert weight.size == ref.size, where
            np.testing.assert_array_equal(
                weight.astype(np.float64).reshape(ref.shape), ref.astype(np.float64), where
            )
        for key in ("center", "scale", "trainable"):
            assert getattr(layer, key) == keras_config[key], f"{where}: {key}"
        assert layer.renorm == keras_config.get("renorm", False), where
        if layer.renorm:
            assert layer.renorm_clipping == keras_config["renorm_clipping"], where
            assert layer.renorm_momentum == pytest.approx(keras_config["renorm_momentum"])
        assert layer.epsilon == pytest.approx(keras_config["epsilon"]), where
        assert layer.momentum == pytest.approx(keras_config["momentum"]), where
        ours = layer.get_config()
        for key in OBJECT_KEYS:
            _same_object(f"{where}.{key}", ours[key], keras_config[key])
        # Built for the input shape Keras built it for; sizes a legacy config does not record
        # stay None (test_traced_input_ranks_of_a_legacy_file).
        built = layer._build_input_shape
        assert len(built) == len(facts["input_shape"]), where
        assert all(b in (None, r) for b, r in zip(built[1:], facts["input_shape"][1:])), where

        # Inference computes what Keras computed.
        x = arrays[f"{i}_x"].astype(np.float64 if layer.dtype == "float64" else np.float32)
        y = np.asarray(layer(x, training=False)).astype(np.float64)
        ref_y = arrays[f"{i}_y"].astype(np.float64)
        rtol = 2e-2 if "bfloat16" in layer.dtype_policy else 2e-4
        np.testing.assert_allclose(y, ref_y, rtol=rtol, atol=rtol * 0.05 * np.abs(ref_y).max())


def test_loaded_constraints_and_regularizers_are_on_the_weights() -> None:
    layers = {layer.name: layer for layer in batchnorm.load_keras(MODELS / "k3_model.keras")}
    no_center = layers["bn_no_center"]
    assert no_center.beta is None
    assert isinstance(no_center.gamma.constraint, batchnorm.constraints.NonNeg)
    assert isinstance(no_center.gamma.regularizer, batchnorm.regularizers.L2)
    frozen = layers["bn_frozen"]
    assert frozen.trainable is False and frozen.trainable_variables == []
    assert isinstance(frozen.beta.constraint, batchnorm.constraints.MaxNorm)
    assert isinstance(frozen.gamma.constraint, batchnorm.constraints.MinMaxNorm)
    assert frozen.beta.regularizer.get_config()["l1"] == pytest.approx(0.02)


def test_loaded_layers_serialize_like_keras() -> None:
    recorded, _ = _expected("k3_model")
    for layer, facts in zip(batchnorm.load_keras(MODELS / "k3_model.keras"), recorded):
        ours, keras = batchnorm.serialize(layer), facts["entry"]
        assert set(ours) == set(keras) and set(ours["config"]) == set(keras["config"])
        assert ours["build_config"] == keras["build_config"]
        assert ours["config"]["axis"] == keras["config"]["axis"]


def test_traced_input_ranks_of_a_legacy_file() -> None:
    # tf.keras 2 .h5 configs record no input shapes: they are traced from the model's input.
    shapes = {
        layer.name: layer._build_input_shape
        for layer in batchnorm.load_keras(MODELS / "k2_model.h5")
    }
    assert shapes == {
        "bn_axis1": (None, 3, None, None),  # the Input's shape is (None, 3, 4, 4)...
        "bn_renorm": (None, None, None, 5),  # ... Permute, Conv2D keep the rank
        "bn_no_center": (None, None, None, 5),
        "bn_frozen": (None, 3),  # GlobalAveragePooling2D, Dense
        "bn_nested": (None, 4),  # the nested Sequential's own InputLayer
    }


def _legacy_config() -> dict[str, Any]:
    with h5py.File(MODELS / "k2_model.h5", "r") as f:
        return json.loads(f.attrs["model_config"])


def test_input_shapes_settle_untraceable_layers() -> None:
    config = _legacy_config()
    for entry in config["config"]["layers"]:
        if entry["class_name"] == "Conv2D":
            entry["class_name"] = "MyConv"  # a custom layer: its output rank is unknown here
    with pytest.raises(ValueError, match="bn_renorm: .*input_shapes="):
        batchnorm.load_keras(MODELS / "k2_model.h5", config=config)
    shape = (None, 4, 4, 5)
    layers = batchnorm.load_keras(
        MODELS / "k2_model.h5",
        config=json.dumps(config),
        input_shapes={"bn_renorm": shape, "bn_no_center": [None, 4, 4, 5]},
    )
    assert [layer._build_input_shape for layer in layers[1:3]] == [shape, shape]
    reference = batchnorm.load_keras(MODELS / "k2_model.h5")
    for got, want in zip(layers, reference):
        for a, b in zip(got.get_weights(), want.get_weights()):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no BatchNormalization.*'conv'"):
        batchnorm.load_keras(MODELS / "k2_model.h5", input_shapes={"conv": (None, 4, 4, 3)})
    with pytest.raises(ValueError, match="bn_renorm: input_shapes gives"):
        batchnorm.load_keras(MODELS / "k3_model.keras", input_shapes={"bn_renorm": (None, 5)})


@pytest.mark.parametrize("filename", ["k3_model.weights.h5", "k2_model_weights.h5"])
def test_weights_only_files_need_a_config(filename: str) -> None:
    with pytest.raises(ValueError, match="weights only.*config="):
        batchnorm.load_keras(MODELS / filename)


def test_config_that_does_not_match_the_weights() -> None:
    # The layer names of another model are not in this weights file.
    with pytest.raises(ValueError, match="no layer named 'bn_bfloat16'"):
        batchnorm.load_keras(MODELS / "k3_model.weights.h5", config=MODELS / "k3_dtypes.keras")
    with pytest.raises(ValueError, match="bn_bfloat16: the weights file has no weights"):
        batchnorm.load_keras(MODELS / "k2_model_weights.h5", config=MODELS / "k3_dtypes.keras")
    # Same names, different layers: the sizes disagree.
    config = _legacy_config()
    for entry in config["config"]["layers"]:
        if entry["name"] == "bn_frozen":
            entry["config"]["renorm"] = True
    with pytest.raises(ValueError, match="bn_frozen: the file holds the weights"):
        batchnorm.load_keras(MODELS / "k2_model.h5", config=config)


def test_bad_files_and_configs(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        batchnorm.load_keras(tmp_path / "missing.keras")
    text = tmp_path / "model.h5"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="neither a .keras archive nor an HDF5 file"):
        batchnorm.load_keras(text)
    archive = tmp_path / "model.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(ValueError, match="without model.weights.h5"):
        batchnorm.load_keras(archive)
    no_config = tmp_path / "no_config.keras"
    with zipfile.ZipFile(no_config, "w") as z:
        z.writestr("model.weights.h5", b"")
    for call in (
        lambda: batchnorm.load_keras(no_config),
        lambda: batchnorm.load_keras(MODELS / "k3_model.weights.h5", config=no_config),
    ):
        with pytest.raises(ValueError, match="has no config.json"):
            call()
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(ValueError, match="without Keras model weights"):
        batchnorm.load_keras(empty)
    with pytest.raises(ValueError, match="not valid JSON"):
        batchnorm.load_keras(MODELS / "k3_model.keras", config="{not json")
    with pytest.raises(TypeError, match="config must be"):
        batchnorm.load_keras(MODELS / "k3_model.keras", config=3)  # type: ignore[arg-type]
    subclassed = {"class_name": "MyModel", "config": {"units": 3}}
    with pytest.raises(ValueError, match="'MyModel'.* lists no layers"):
        batchnorm.load_keras(MODELS / "k3_model.keras", config=subclassed)


def test_without_h5py_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ModuleNotFoundError, match=r'pip install "batchnorm\[keras\]"'):
        batchnorm.load_keras(MODELS / "k3_model.keras")
