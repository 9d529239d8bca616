"""`load_keras`: the BatchNormalization layers of a saved Keras model, built and holding the
saved weights, without TensorFlow or Keras.

Files read (h5py is needed: `pip install "batchnorm[keras]"`):

* Keras 3 and tf.keras 2 `.keras` archives: a zip with `config.json` (the model config)
  and `model.weights.h5`, whose layers are groups `layers/<key>/vars/0..n` (nested models:
  `layers/<model key>/layers/<key>/...`). The key is the snake-cased class name made unique
  per container (`batch_normalization`, `batch_normalization_1`, ...); recent Keras 3 releases
  (3.15 does) also store the layer's name as the `name` attribute of `vars`, which is then
  used instead.
* `.weights.h5` files with that same layout (`model.save_weights`), which hold no config: pass
  the model's config as `config=`.
* Legacy HDF5 files of tf.keras 2 and Keras 3 (`model.save("x.h5")`): the config in the root
  attribute `model_config`, the weights in `model_weights/<layer>/` listed by the attributes
  `layer_names` and `weight_names` (`<layer>/<weight>:0` in tf.keras 2,
  `<model>/.../<layer>/<weight>` in Keras 3); tf.keras 2's `model.save_weights("x.h5")` writes
  the same layout at the root and no config (pass `config=`).

A layer is built from the input shape its config records (`build_config`, the tensors of
Keras 3's `inbound_nodes`, `batch_input_shape`). Legacy configs record no shapes for most
layers, so there the input rank is traced from the model's input through the layers before it
(only layers whose output rank is known here are traced; `input_shapes=` settles the rest).
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .layer import BatchNormalization, build_input_shape
from .serialization import _CLASS_NAMES, _SYNC_CLASS_NAME, deserialize

PathLike = Union[str, "os.PathLike[str]"]
Shape = tuple[Union[int, None], ...]

_BN_CLASSES = _CLASS_NAMES | {_SYNC_CLASS_NAME}

# Layers whose output has the rank of their (first) input. Only the rank matters: a
# BatchNormalization is built from its input rank and the sizes of its saved weights.
_SAME_RANK = frozenset(
    {
        *_BN_CLASSES,
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
        "Normalization",
        "Rescaling",
        "Dense",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "Softmax",
        "ThresholdedReLU",
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "ActivityRegularization",
        "Masking",
        "Permute",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
        "Concatenate",
        *(
            f"{kind}{d}D"
            for d in (1, 2, 3)
            for kind in (
                "Conv",
                "Convolution",
                "DepthwiseConv",
                "SeparableConv",
                "SeparableConvolution",
                "MaxPooling",
                "MaxPool",
                "AveragePooling",
                "AvgPool",
                "ZeroPadding",
                "Cropping",
                "UpSampling",
            )
        ),
        *(f"Conv{d}DTranspose" for d in (1, 2, 3)),
        *(f"Convolution{d}DTranspose" for d in (1, 2, 3)),
    }
)
_GLOBAL_POOLING = re.compile(r"^Global(Average|Max|Avg)Pool(ing)?[123]D$")
_MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as error:
        raise ModuleNotFoundError(
            "batchnorm.load_keras reads Keras' HDF5 weights with h5py, which is not installed; "
            'install it with: pip install "batchnorm[keras]"',
            name="h5py",
        ) from error
    return h5py


# ---- the model config ------------------------------------------------------------------------


@dataclass
class _Found:
    """A BatchNormalization entry of the model config and where it sits."""

    entry: Mapping[str, Any]
    models: tuple[str, ...]  # names of the nested models around it, outermost first
    input_shape: Shape | None  # full shape, or a rank with unknown sizes (all None)


def _entry_name(entry: Mapping[str, Any]) -> str | None:
    config = entry.get("config")
    name = entry.get("name") or (config.get("name") if isinstance(config, Mapping) else None)
    return name if isinstance(name, str) else None


def _name(entry: Mapping[str, Any]) -> str:
    name = _entry_name(entry)
    if name is None:
        raise ValueError(f"a layer entry of the model config has no name: {_brief(entry)}")
    return name


def _brief(entry: Any) -> str:
    text = json.dumps(entry, default=str)
    return text if len(text) <= 200 else text[:200] + "..."


def _sublayers(entry: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The layer entries of a model entry, or None for a layer that is not a model."""
    config = entry.get("config")
    layers = config.get("layers") if isinstance(config, Mapping) else None
    if not isinstance(layers, list):
        return None
    return [layer for layer in layers if isinstance(layer, Mapping)]


def _declared_shape(entry: Mapping[str, Any]) -> Shape | None:
    """The input shape an entry states itself: build_config, or the batch shape given to a
    model's first layer (and to InputLayer)."""
    config = entry.get("config")
    config = config if isinstance(config, Mapping) else {}
    for build_config in (entry.get("build_config"), config.get("build_config")):
        try:
            shape = build_input_shape(build_config)
        except (TypeError, ValueError):
            shape = None  # a model's build_config may hold several inputs
        if shape is not None:
            return shape
    for key in ("batch_shape", "batch_input_shape"):
        shape = config.get(key)
        if isinstance(shape, list):
            return tuple(shape)
    return None


def _keras3_inbound_shape(entry: Mapping[str, Any]) -> Shape | None:
    """The first input's shape, as Keras 3 functional configs record it in `inbound_nodes`."""
    nodes = entry.get("inbound_nodes")
    if not isinstance(nodes, list) or not nodes or not isinstance(nodes[0], Mapping):
        return None
    args = nodes[0].get("args")
    first = args[0] if isinstance(args, list) and args else None
    if isinstance(first, list) and first:
        first = first[0]
    if isinstance(first, Mapping) and first.get("class_name") == "__keras_tensor__":
        shape = first.get("config", {}).get("shape")
        if isinstance(shape, list):
            return tuple(shape)
    return None


def _legacy_inbound_layer(entry: Mapping[str, Any]) -> str | None:
    """The layer feeding the first input, in tf.keras 2's `inbound_nodes` ([[[name, ...]]])."""
    nodes = entry.get("inbound_nodes")
    try:
        name = nodes[0][0][0]
    except (TypeError, IndexError, KeyError):
        return None
    return name if isinstance(name, str) else None


def _rank_after(entry: Mapping[str, Any], rank: int | None) -> int | None:
    """The output rank of a layer fed an input of `rank`, where it is known here."""
    class_name = entry.get("class_name")
    config = entry.get("config")
    config = config if isinstance(config, Mapping) else {}
    if class_name == "InputLayer":
        shape = _declared_shape(entry)
        return None if shape is None else len(shape)
    if class_name == "Flatten":
        return 2
    if class_name == "Reshape" and isinstance(config.get("target_shape"), list):
        return len(config["target_shape"]) + 1
    if isinstance(class_name, str) and _GLOBAL_POOLING.match(class_name):
        return rank if config.get("keepdims") else 2
    return rank if class_name in _SAME_RANK else None


def _walk(
    model: Mapping[str, Any], models: tuple[str, ...], model_input: Shape | None, out: list[_Found]
) -> int | None:
    """Appends the BatchNormalization entries of `model` (depth first, in config order) to
    `out` and returns the model's output rank where known. A layer's input shape is the one its
    entry records, else a rank traced from the layer before it (Sequential) or from the layer
    its first input comes from (functional)."""
    layers = _sublayers(model) or []
    functional = any("inbound_nodes" in layer for layer in layers)
    output_ranks: dict[str, int | None] = {}
    previous = None if model_input is None else len(model_input)
    for layer in layers:
        if functional:
            source = _legacy_inbound_layer(layer)
            in_rank = output_ranks.get(source) if source is not None else None
        else:
            in_rank = previous
        shape = _declared_shape(layer) or _keras3_inbound_shape(layer)
        if shape is None and in_rank is not None:
            shape = (None,) * in_rank
        if layer.get("class_name") in _BN_CLASSES:
            out.append(_Found(layer, models, shape))
        if _sublayers(layer) is not None:
            previous = _walk(layer, (*models, _name(layer)), shape, out)
        else:
            previous = _rank_after(layer, None if shape is None else len(shape))
        output_ranks[_entry_name(layer) or ""] = previous
    if functional:
        outputs = model.get("config", {}).get("output_layers")
        try:
            first = outputs[0] if isinstance(outputs[0], list) else outputs
            return output_ranks.get(first[0])
        except (TypeError, IndexError, KeyError, AttributeError):
            return None
    return previous


def _model_config(source: Any) -> Mapping[str, Any]:
    """The `config=` argument as a model config dict."""
    if isinstance(source, Mapping):
        return source
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return _parse_json(source, "config")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if "config.json" not in archive.namelist():
                    raise ValueError(f"{path}: the .keras archive has no config.json")
                return _parse_json(archive.read("config.json"), f"{path}: config.json")
        with open(path, "rb") as file:
            return _parse_json(file.read(), path)
    raise TypeError(
        "config must be a model config (a dict, JSON text, or the path of a .json or .keras "
        f"file), got {type(source).__name__}"
    )


def _parse_json(text: str | bytes, what: str) -> Mapping[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{what}: not valid JSON ({error})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


# ---- the weights -----------------------------------------------------------------------------


def _dataset(h5: Any) -> np.ndarray:
    value = h5[()]
    if h5.attrs.get("dtype") == "bfloat16":
        # Keras 3 stores bfloat16 as 2-byte opaque values; their bits are a float32's top half.
        bits = np.asarray(value).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(np.shape(value))
    return np.asarray(value)


def _snake_case(class_name: str) -> str:
    # Keras' group key for a layer: "BatchNormalization" -> "batch_normalization".
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


class _KerasV3Weights:
    """`layers/<key>/vars/<i>` groups of `model.weights.h5` and `.weights.h5` files."""

    def __init__(self, root: Any, model: Mapping[str, Any]) -> None:
        self._root = root
        self._model = model

    def _child(self, group: Any, container: Mapping[str, Any], name: str, where: str) -> Any:
        layers = group.get("layers")
        if layers is None:
            raise ValueError(f"{where}: the weights file has no group 'layers' here")
        named = False
        for key in layers:
            vars_group = layers[key].get("vars")
            saved_name = None if vars_group is None else vars_group.attrs.get("name")
            if saved_name == name:
                return layers[key]
            named = named or saved_name is not None
        if named:
            raise ValueError(f"{where}: the weights file has no layer named {name!r}")
        # Files without the name attribute: recompute Keras' keys in config order.
        used: dict[str, int] = {}
        for entry in _sublayers(container) or []:
            base = _snake_case(str(entry.get("class_name", "")))
            used[base] = used.get(base, -1) + 1
            key = base if used[base] == 0 else f"{base}_{used[base]}"
            if _entry_name(entry) == name:
                if key not in layers:
                    raise ValueError(f"{where}: the weights file has no group 'layers/{key}'")
                return layers[key]
        raise ValueError(f"{where}: layer {name!r} is not in the model config")

    def arrays(self, found: _Found, count: int) -> list[np.ndarray] | dict[str, np.ndarray]:
        group, container = self._root, self._model
        where = ""
        for model_name in found.models:
            group = self._child(group, container, model_name, where or "the model")
            container = next(e for e in _sublayers(container) or [] if _entry_name(e) == model_name)
            where = f"{where}/{model_name}" if where else model_name
        name = _name(found.entry)
        vars_group = self._child(group, container, name, where or "the model").get("vars")
        keys = sorted(vars_group, key=int) if vars_group is not None else []
        if len(keys) != count:
            raise ValueError(
                f"{name}: the weights file holds {len(keys)} weights for this layer, but its "
                f"config gives {count}"
            )
        # Keras saves the trainable-at-creation weights first (gamma, beta), then the others
        # in creation order (moving statistics, renorm): our order, also for frozen layers.
        return [_dataset(vars_group[key]) for key in keys]


def _h5_strings(group: Any, name: str) -> list[str]:
    """A list attribute that Keras may have split into `name0`, `name1`, ... (HDF5 limits the
    size of one attribute)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values = []
        chunk = 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


class _LegacyWeights:
    """`<layer>/<weight name>` datasets of legacy HDF5 files, listed by `weight_names`."""

    def __init__(self, root: Any) -> None:
        self._root = root
        self._layer_names = set(_h5_strings(root, "layer_names"))

    def arrays(self, found: _Found, count: int) -> list[np.ndarray] | dict[str, np.ndarray]:
        name = _name(found.entry)
        top = found.models[0] if found.models else name
        if top not in self._layer_names or top not in self._root:
            raise ValueError(f"{name}: the weights file has no weights for layer {top!r}")
        group = self._root[top]
        result: dict[str, np.ndarray] = {}
        for weight_name in _h5_strings(group, "weight_names"):
            parts = weight_name.split("/")
            # A top-level layer's group holds its weights only. A nested model's group holds
            # those of all its layers, named "bn/gamma:0" (tf.keras 2) or "model/.../bn/gamma"
            # (Keras 3): the part before the weight's own name is the layer's.
            if not found.models or (len(parts) >= 2 and parts[-2] == name):
                role = parts[-1].split(":")[0]
                if role in result:
                    raise ValueError(
                        f"{name}: two saved weights are named {role!r} for this layer name in "
                        f"{top!r} (layers of the same name in several nested models)"
                    )
                result[role] = _dataset(group[weight_name])
        return result


# ---- building the layers ---------------------------------------------------------------------


def _build(layer: BatchNormalization, found: _Found, sizes: np.ndarray, given: Any) -> None:
    """Builds `layer` for the recorded (or given) input shape; feature sizes missing from a
    rank-only shape come from the saved moving mean (`sizes`)."""
    name = layer.name
    shape = found.input_shape if given is None else tuple(given)
    if shape is None:
        raise ValueError(
            f"{name}: the model config records no input shape for this layer and none could be "
            "traced from the model's input; pass input_shapes={" + repr(name) + ": (None, ...)}"
        )
    full = list(shape)
    axes = list(layer.options.schema([1] * len(full)).axes)  # resolved, sizes not needed
    missing = [a for a in axes if full[a] is None]
    if missing:
        if len(axes) == 1:
            full[axes[0]] = int(sizes.size)
        elif sizes.ndim >= len(full):  # full-rank weights (axis lists; +1 with ghost batches)
            tail = sizes.shape[sizes.ndim - len(full) :]
            for a in missing:
                full[a] = int(tail[a])
        else:
            raise ValueError(f"{name}: cannot infer the feature sizes of the input {shape}")
    layer.build(tuple(full))


def _load(
    weights: _KerasV3Weights | _LegacyWeights,
    model: Mapping[str, Any],
    input_shapes: Mapping[str, Sequence[int | None]],
) -> list[BatchNormalization]:
    if _sublayers(model) is None:
        raise ValueError(
            f"the model config ({model.get('class_name')!r}) lists no layers: only Sequential "
            "and functional models (and models nested in them) can be read"
        )
    found: list[_Found] = []
    _walk(model, (), None, found)
    layers = []
    for item in found:
        name = _name(item.entry)
        layer = deserialize(item.entry)
        given = input_shapes.get(name)
        names = layer.options.weight_names()  # Keras' order, which files keep too
        arrays = weights.arrays(item, len(names))
        if isinstance(arrays, dict):
            if sorted(arrays) != sorted(names):
                raise ValueError(
                    f"{name}: the file holds the weights {sorted(arrays)} for this layer, but its "
                    f"config needs {names}"
                )
            arrays = [arrays[n] for n in names]
        if given is not None and layer.built and tuple(given) != layer._build_input_shape:
            raise ValueError(
                f"{name}: input_shapes gives {tuple(given)}, but the model config builds this "
                f"layer for {layer._build_input_shape}"
            )
        if not layer.built:
            _build(layer, item, arrays[names.index("moving_mean")], given)
        layer.set_weights(arrays)
        layers.append(layer)
    unknown = set(input_shapes) - {layer.name for layer in layers}
    if unknown:
        raise ValueError(
            f"input_shapes names layers that are no BatchNormalization of the model: "
            f"{sorted(unknown)}"
        )
    return layers


def load_keras(
    path: PathLike,
    *,
    config: Mapping[str, Any] | PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> list[BatchNormalization]:
    """The BatchNormalization layers of a saved Keras model, in model order (nested models
    depth first), each built and holding the saved weights, with the names and configs Keras
    saved.

    `path`: a Keras 3 / tf.keras `.keras` archive, a legacy `.h5` model (tf.keras 2 or Keras 3
    `model.save("x.h5")`), or a weights-only file (`.weights.h5`, or tf.keras 2's
    `model.save_weights("x.h5")`). `config`: the model's config, needed for weights-only files
    and used instead of the file's own otherwise: a dict (`json.loads(model.to_json())`), JSON
    text, or the path of a `.json` file or of a `.keras` archive. `input_shapes`: the input shape
    of layers (by name) whose shape the config does not record and cannot be traced.

    Raises ModuleNotFoundError without h5py, FileNotFoundError for a missing file, and
    ValueError for a file or config that does not match (naming the layer)."""
    h5py = _import_h5py()
    filename = os.fspath(path)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"load_keras: no such file: {filename!r}")
    shapes = dict(input_shapes or {})
    model = None if config is None else _model_config(config)
    if zipfile.is_zipfile(filename):
        with zipfile.ZipFile(filename) as archive:
            members = set(archive.namelist())
            if "model.weights.h5" not in members:
                raise ValueError(f"{filename}: a zip without model.weights.h5 is not a .keras file")
            if model is None:
                if "config.json" not in members:
                    raise ValueError(f"{filename}: the .keras archive has no config.json")
                model = _parse_json(archive.read("config.json"), f"{filename}: config.json")
            data = archive.read("model.weights.h5")
        with h5py.File(io.BytesIO(data), "r") as root:
            return _load(_KerasV3Weights(root, model), model, shapes)
    if not h5py.is_hdf5(filename):
        raise ValueError(f"{filename}: neither a .keras archive nor an HDF5 file")
    with h5py.File(filename, "r") as root:
        if "model_config" in root.attrs and "model_weights" in root:
            if model is None:
                text = root.attrs["model_config"]
                model = _parse_json(text, f"{filename}: model_config")
            return _load(_LegacyWeights(root["model_weights"]), model, shapes)
        legacy = "layer_names" in root.attrs or "layer_names0" in root.attrs
        if not legacy and "layers" not in root:
            raise ValueError(f"{filename}: an HDF5 file without Keras model weights")
        if model is None:
            raise ValueError(
                f"{filename} holds weights only, no model config, so the layers' axis, "
                "epsilon, ... are unknown: pass config= (json.loads(model.to_json()), or the "
                "config.json of the model's .keras file)"
            )
        source = _LegacyWeights(root) if legacy else _KerasV3Weights(root, model)
        return _load(source, model, shapes)
