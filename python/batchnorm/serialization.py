"""Keras-style serialization of whole layers: `serialize(layer)` writes the entry a Keras model's
config lists for a layer (`{"module", "class_name", "config", "registered_name"}` plus
`build_config` once built), and `deserialize(entry)` reads the BatchNormalization entries of
tf.keras 2 and Keras 3 model configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .layer import BatchNormalization, build_input_shape

# Class names Keras writes for this layer. tf.keras 1.x/2.x saved the versioned classes under
# their own names, and tf.keras 2's SyncBatchNormalization is the layer with synchronized=True.
_CLASS_NAMES = frozenset({"BatchNormalization", "BatchNormalizationV1", "BatchNormalizationV2"})
_SYNC_CLASS_NAME = "SyncBatchNormalization"

# Our config keys that Keras 3's layer does not accept: left out at their defaults, so that
# Keras 3 can deserialize what `serialize` writes.
_KERAS3_ABSENT_KEYS = ("virtual_batch_size", "fused")


def serialize(layer: BatchNormalization) -> dict[str, Any]:
    """The layer as a Keras model config lists it: `module`, `class_name`, `config` (the layer's
    `get_config()`), `registered_name`, and `build_config` (`{"input_shape": [...]}`) when the
    layer is built. `deserialize` (or Keras 3's `keras.layers.deserialize`) reads it back."""
    if not isinstance(layer, BatchNormalization):
        raise TypeError(f"serialize expects a BatchNormalization layer, got {type(layer).__name__}")
    config = layer.get_config()
    for key in _KERAS3_ABSENT_KEYS:
        if config.get(key) is None:
            del config[key]
    entry: dict[str, Any] = {
        "module": "keras.layers",
        "class_name": "BatchNormalization",
        "config": config,
        "registered_name": None,
    }
    if layer.built and layer._build_input_shape is not None:
        entry["build_config"] = {"input_shape": list(layer._build_input_shape)}
    return entry


def deserialize(entry: Mapping[str, Any]) -> BatchNormalization:
    """A layer from a serialized entry: what `serialize` writes, or a BatchNormalization entry
    of a tf.keras 2 or Keras 3 model config (`model.to_json()`, a `.keras` file's `config.json`,
    an `.h5` file's `model_config`); extra keys such as `name` and `inbound_nodes` are ignored.
    The layer is built when the entry (or its config) has a `build_config`.

    Raises TypeError for a non-dict and ValueError for an entry of another class."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"deserialize expects a dict, got {type(entry).__name__}")
    if "class_name" not in entry or "config" not in entry:
        raise ValueError(
            "deserialize expects a serialized layer {'class_name': 'BatchNormalization', "
            f"'config': {{...}}, ...}}, got the keys {sorted(entry)}; a bare layer config goes to "
            "BatchNormalization.from_config"
        )
    class_name = entry["class_name"]
    registered = entry.get("registered_name")
    if registered is not None and registered != class_name:
        raise ValueError(
            f"deserialize: {registered!r} is a custom registered class; only Keras' own "
            "BatchNormalization can be rebuilt here"
        )
    config = entry["config"]
    if not isinstance(config, Mapping):
        raise TypeError(f"deserialize: 'config' must be a dict, got {type(config).__name__}")
    if class_name == _SYNC_CLASS_NAME:
        config = {**config, "synchronized": True}
    elif class_name not in _CLASS_NAMES:
        raise ValueError(
            f"deserialize: class_name {class_name!r} is not a BatchNormalization layer "
            f"(accepted: {sorted(_CLASS_NAMES | {_SYNC_CLASS_NAME})})"
        )
    # Keras 3 writes build_config next to config, not inside it.
    input_shape = build_input_shape(entry.get("build_config"))
    layer = BatchNormalization.from_config(config)
    if input_shape is not None and not layer.built:
        layer.build(input_shape)
    return layer
