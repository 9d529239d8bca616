"""Record small saved Keras models for ``batchnorm.load_keras`` (tests/test_keras_files.py).

Run (needs TensorFlow, tf-keras 2 and Keras 3 with h5py in a private environment; CI never
runs this, the tests read the files it writes):

    python3 -m venv /tmp/kenv
    /tmp/kenv/bin/pip install tensorflow==2.21.0 tf-keras==2.21.0 keras==3.15.1 h5py
    /tmp/kenv/bin/python tests/keras_reference/record_models.py

It builds the same functional model (several BatchNormalization layers: axis 1 on an NCHW-like
input and axis -1, renorm with clipping, center=False with an l2 regularizer and non_neg
constraint, l1/max_norm/min_max_norm on a frozen layer, and a nested Sequential with
scale=False) with Keras 3 and with tf-keras 2, gives every weight random non-trivial values,
and saves it in every format ``load_keras`` reads, under ``models/``:

* ``k3_model.keras`` (Keras 3 archive), ``k3_model.weights.h5`` (``save_weights``, no config),
  ``k3_model_legacy.h5`` (Keras 3 ``model.save("x.h5")``), ``k3_model.config.json``
  (``to_json()``);
* ``k2_model.h5`` (tf-keras ``model.save``), ``k2_model_weights.h5`` (tf-keras
  ``save_weights("x.h5")``, no config), ``k2_model.keras`` (tf-keras' own archive, whose
  weight groups carry no layer names), ``k2_model.config.json`` (``to_json()``);
* ``k3_dtypes.keras``: a Keras 3 Sequential with a bfloat16 and a float64 layer (bfloat16
  weights are stored as opaque 2-byte values).

For each model, ``<model>.expected.json`` holds the expected facts per BatchNormalization
layer, in model order: ``name``, ``config`` (``get_config()``), ``entry`` (the serialized layer
as the model config lists it), ``weight_names`` and ``input_shape`` (the shape the test feeds),
and ``<model>.expected.npz`` the arrays: ``<i>_w<j>`` the layer's weights (Keras order, float32,
exact for 16-bit weights), ``<i>_x`` an input and ``<i>_y`` Keras' inference output on it.
"""

import json
import os
import zipfile

os.environ.pop("TF_USE_LEGACY_KERAS", None)
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

assert tf_keras.__version__.startswith("2."), tf_keras.__version__
assert keras.__version__.startswith("3."), keras.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "models")
CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}


def functional_model(lib):
    """The same small functional model in either library."""
    layers = lib.layers
    inp = lib.Input((3, 4, 4), name="image")  # channels first
    x = layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-4, name="bn_axis1")(inp)
    x = layers.Permute((2, 3, 1), name="to_channels_last")(x)
    x = layers.Conv2D(5, 3, padding="same", name="conv")(x)
    x = layers.BatchNormalization(
        renorm=True, renorm_clipping=CLIP, renorm_momentum=0.9, name="bn_renorm"
    )(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.BatchNormalization(
        center=False, gamma_regularizer="l2", gamma_constraint="non_neg", name="bn_no_center"
    )(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(3, name="dense")(x)
    x = layers.BatchNormalization(
        beta_regularizer=lib.regularizers.L1(0.02),
        beta_constraint="max_norm",
        gamma_constraint={
            "class_name": "MinMaxNorm",
            "config": {"min_value": 0.5, "max_value": 2.0},
        },
        trainable=False,
        name="bn_frozen",
    )(x)
    head = lib.Sequential(
        [
            lib.Input((3,)),
            layers.Dense(4, name="head_dense"),
            layers.BatchNormalization(scale=False, name="bn_nested"),
        ],
        name="head",
    )
    return lib.Model(inp, head(x), name="model")


def dtypes_model():
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.BatchNormalization(dtype="bfloat16", name="bn_bfloat16"),
            keras.layers.BatchNormalization(dtype="float64", momentum=0.5, name="bn_float64"),
        ],
        name="dtypes",
    )


def batchnorm_layers(model):
    """The BatchNormalization layers in model order, nested models depth first."""
    found = []
    for layer in model.layers:
        if hasattr(layer, "layers"):
            found.extend(batchnorm_layers(layer))
        elif type(layer).__name__ == "BatchNormalization":
            found.append(layer)
    return found


def randomize(model, rng):
    """Random non-trivial values for every weight (by role for the BatchNormalization ones)."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            randomize(layer, rng)
            continue
        values = []
        for w in layer.weights:
            role = w.name.split("/")[-1].split(":")[0]
            shape = tuple(w.shape)
            if role == "gamma":
                v = rng.uniform(0.5, 1.5, shape)
            elif role in ("beta", "bias"):
                v = rng.normal(0.0, 0.5, shape)
            elif role in ("moving_mean", "renorm_mean"):
                v = rng.normal(0.0, 1.0, shape)
            elif role in ("moving_variance",):
                v = rng.uniform(0.5, 2.0, shape)
            elif role in ("moving_stddev", "renorm_stddev"):
                v = rng.uniform(0.7, 1.4, shape)
            else:
                v = rng.normal(0.0, 0.3, shape)
            values.append(v)
        layer.set_weights(values)


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListWrapper":
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def widened(value):
    t = tf.convert_to_tensor(value)
    if t.dtype in (tf.float16, tf.bfloat16):
        t = tf.cast(t, tf.float32)
    return t.numpy()


def record_expected(name, model, lib, rng, serialize):
    meta = {
        "library": "keras3" if lib is keras else "tf_keras",
        "library_version": lib.__version__,
        "tensorflow_version": tf.__version__,
        "layers": [],
    }
    arrays = {}
    for i, layer in enumerate(batchnorm_layers(model)):
        input_shape = (2, *tuple(layer.input.shape)[1:])
        x = rng.normal(1.0, 2.0, input_shape).astype(np.float32)
        y = layer(tf.constant(x, dtype=layer.compute_dtype), training=False)
        for j, w in enumerate(layer.get_weights()):
            arrays[f"{i}_w{j}"] = widened(w)
        arrays[f"{i}_x"] = x
        arrays[f"{i}_y"] = widened(y)
        meta["layers"].append(
            {
                "name": layer.name,
                "config": jsonable(layer.get_config()),
                "entry": jsonable(serialize(layer)),
                "weight_names": [w.name.split("/")[-1].split(":")[0] for w in layer.weights],
                "input_shape": list(input_shape),
            }
        )
    with open(os.path.join(OUT, name + ".expected.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    np.savez_compressed(os.path.join(OUT, name + ".expected.npz"), **arrays)


def save_json(model, path):
    with open(path, "w") as f:
        json.dump(json.loads(model.to_json()), f, indent=1, sort_keys=True)
        f.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240611)

    model = functional_model(keras)
    randomize(model, rng)
    model.save(os.path.join(OUT, "k3_model.keras"))
    model.save_weights(os.path.join(OUT, "k3_model.weights.h5"))
    model.save(os.path.join(OUT, "k3_model_legacy.h5"))
    save_json(model, os.path.join(OUT, "k3_model.config.json"))
    record_expected("k3_model", model, keras, rng, keras.saving.serialize_keras_object)

    model = functional_model(tf_keras)
    randomize(model, rng)
    model.save(os.path.join(OUT, "k2_model.h5"))
    model.save_weights(os.path.join(OUT, "k2_model_weights.h5"))
    model.save(os.path.join(OUT, "k2_model.keras"))
    save_json(model, os.path.join(OUT, "k2_model.config.json"))
    record_expected("k2_model", model, tf_keras, rng, tf_keras.layers.serialize)

    model = dtypes_model()
    randomize(model, rng)
    model.save(os.path.join(OUT, "k3_dtypes.keras"))
    record_expected("k3_dtypes", model, keras, rng, keras.saving.serialize_keras_object)

    for f in sorted(os.listdir(OUT)):
        path = os.path.join(OUT, f)
        extra = ""
        if f.endswith(".keras"):
            with zipfile.ZipFile(path) as z:
                extra = f" ({', '.join(z.namelist())})"
        print(f"{f}: {os.path.getsize(path)} bytes{extra}")
    print(
        f"Keras {keras.__version__}, tf-keras {tf_keras.__version__}, TensorFlow {tf.__version__}"
    )


if __name__ == "__main__":
    main()
