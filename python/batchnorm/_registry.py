"""Shared identifier resolution for initializers, regularizers and constraints.

One `Registry` per family turns what Keras users write (a name, a Keras 2 or Keras 3 config
dict, an instance, a class, a plain callable) into an object, and back into a config.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

_T = TypeVar("_T", bound=type)

# Top-level modules whose objects we recognise as "the real Keras": such objects are rebuilt
# as our own class of the same name from their `get_config()`, so they keep working here.
_KERAS_MODULES = ("keras", "tf_keras", "tensorflow")


class Configurable:
    """Mixin for classes that round-trip through `get_config()` / `from_config()`."""

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Any:
        return cls(**config)

    def __repr__(self) -> str:
        try:
            config = self.get_config()
        except NotImplementedError:  # user subclasses need not be configurable
            return f"{type(self).__name__}()"
        args = ", ".join(f"{k}={v!r}" for k, v in config.items())
        return f"{type(self).__name__}({args})"


class Registry:
    """Name table and get/serialize/deserialize logic for one family of objects."""

    def __init__(self, kind: str, module: str, base: type) -> None:
        self.kind = kind  # used in error messages: "initializer", "regularizer", ...
        self.module = module  # the Keras 3 "module" field, e.g. "keras.initializers"
        self.base = base
        # identifier -> (class, defaults applied under the given config)
        self._names: dict[str, tuple[type, dict[str, Any]]] = {}
        self._canonical: dict[type, str] = {}

    # -- registration -------------------------------------------------------------------
    def register(self, *aliases: str) -> Callable[[_T], _T]:
        """Class decorator: register the class under its own name and the given aliases."""

        def decorate(cls: _T) -> _T:
            self._canonical[cls] = cls.__name__
            for name in (cls.__name__, *aliases):
                self.add_alias(name, cls)
            return cls

        return decorate

    def add_alias(self, name: str, cls: type, defaults: dict[str, Any] | None = None) -> None:
        """Register `name` for `cls`; `defaults` fill config keys the caller leaves out."""
        if name in self._names:
            raise RuntimeError(f"duplicate {self.kind} identifier {name!r}")
        self._names[name] = (cls, dict(defaults or {}))

    def identifiers(self) -> list[str]:
        """All registered string identifiers (sorted)."""
        return sorted(self._names)

    # -- public operations --------------------------------------------------------------
    def get(self, identifier: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
        """Resolve an identifier to an object of this family, a plain callable, or None."""
        if identifier is None:
            return None
        if isinstance(identifier, self.base):
            return identifier
        if isinstance(identifier, str):
            return self._build(identifier, {}, custom_objects, identifier)
        if isinstance(identifier, Mapping):
            return self.deserialize(identifier, custom_objects)
        if isinstance(identifier, type):
            if issubclass(identifier, self.base):
                return identifier()
            raise TypeError(
                f"Could not interpret {self.kind} identifier: {identifier!r} is a class that "
                f"does not derive from {self.base.__name__}"
            )
        converted = self._from_keras_object(identifier)
        if converted is not None:
            return converted
        if callable(identifier):
            return identifier
        raise TypeError(
            f"Could not interpret {self.kind} identifier: {identifier!r} (expected None, a "
            f"string, a config dict, a {self.base.__name__} or a callable)"
        )

    def serialize(self, obj: Any) -> dict[str, Any] | str | None:
        """Keras 3 config dict for our objects; a plain function serializes to its name."""
        if obj is None:
            return None
        if isinstance(obj, self.base):
            cls = type(obj)
            name = self._canonical.get(cls)
            config = _plain(obj.get_config())
            if name is not None:
                return {
                    "module": self.module,
                    "class_name": name,
                    "config": config,
                    "registered_name": None,
                }
            # A user subclass: same shape as Keras 3 gives an unregistered custom object;
            # deserializing it needs `custom_objects`.
            return {
                "module": cls.__module__,
                "class_name": cls.__name__,
                "config": config,
                "registered_name": cls.__name__,
            }
        # Plain callables carry no config. A named function serializes to its name (what
        # tf-keras 2 writes), so layer configs stay writable; loading it back needs
        # `custom_objects={name: fn}`. Anonymous callables cannot be named, so refuse.
        name = getattr(obj, "__name__", None)
        if callable(obj) and isinstance(name, str) and name != "<lambda>":
            return name
        raise ValueError(
            f"Cannot serialize {self.kind} {obj!r}: only {self.base.__name__} objects and "
            "named functions can be serialized (lambdas and callable objects cannot)"
        )

    def deserialize(self, config: Any, custom_objects: Mapping[str, Any] | None = None) -> Any:
        """Inverse of `serialize`; accepts Keras 3 and tf-keras 2 config dicts and names."""
        if config is None:
            return None
        if isinstance(config, str):
            return self._build(config, {}, custom_objects, config)
        if not isinstance(config, Mapping):
            raise TypeError(
                f"Could not interpret {self.kind} config: {config!r} (expected a dict or str)"
            )
        class_name = config.get("class_name")
        if not isinstance(class_name, str):
            raise ValueError(
                f"Could not interpret {self.kind} config {dict(config)!r}: no 'class_name'"
            )
        inner = config.get("config") or {}
        if class_name == "function":
            # Keras 3 writes plain functions as class_name "function", config = the name.
            if isinstance(inner, str):
                return self._build(inner, {}, custom_objects, config)
            raise ValueError(f"Could not interpret {self.kind} config {dict(config)!r}")
        if not isinstance(inner, Mapping):
            raise ValueError(
                f"Could not interpret {self.kind} config {dict(config)!r}: 'config' must be a dict"
            )
        registered = config.get("registered_name")
        if custom_objects and isinstance(registered, str) and registered in custom_objects:
            class_name = registered
        return self._build(class_name, inner, custom_objects, config)

    # -- helpers ------------------------------------------------------------------------
    def _build(
        self,
        name: str,
        config: Mapping[str, Any],
        custom_objects: Mapping[str, Any] | None,
        shown: Any,
    ) -> Any:
        if custom_objects and name in custom_objects:
            target = custom_objects[name]
            if isinstance(target, type):
                if hasattr(target, "from_config"):
                    return target.from_config(dict(config))
                return target(**config)
            if callable(target):
                return target
            raise TypeError(f"custom_objects[{name!r}] is not a class or a callable")
        entry = self._names.get(name)
        if entry is None:
            raise ValueError(
                f"Could not interpret {self.kind} identifier: {shown!r}. Known identifiers: "
                f"{', '.join(self.identifiers())}"
            )
        cls, defaults = entry
        try:
            return cls.from_config({**defaults, **config})
        except TypeError as exc:  # unknown or missing keys in the config
            raise ValueError(f"Invalid config for {self.kind} {shown!r}: {exc}") from exc

    def _from_keras_object(self, obj: Any) -> Any:
        """Rebuild a real Keras object of a class we also define as our own class."""
        module = getattr(type(obj), "__module__", "") or ""
        if module.split(".")[0] not in _KERAS_MODULES or not hasattr(obj, "get_config"):
            return None
        entry = self._names.get(type(obj).__name__)
        if entry is None:
            return None
        return entry[0].from_config(_plain(obj.get_config()))


def _plain(value: Any) -> Any:
    """Turn NumPy scalars/arrays (and tensors exposing `numpy()`) into JSON-friendly values."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, (types.FunctionType, str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "numpy"):
        value = value.numpy()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
