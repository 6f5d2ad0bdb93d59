"""Typed, validated config trees from plain dicts (YAML via yaml.safe_load).

`from_dict(cls, d)` builds a (frozen) dataclass tree: an unknown key is an error listing the valid
keys, a missing required key or a wrong type is an error naming the dotted path, the expected type
and the value found. `apply_overrides(d, ["a.b=3", ...])` applies CLI `key=value` overrides (values
parsed as YAML). This is the one way a config section is built from YAML: every section class of
the train, sft and estimate configs goes through here.

Two hooks for sections whose YAML form is not "one key per field":
- a class with `from_config(value, path)` (classmethod) and `to_config()` is built by the former and
  written back by the latter (the mesh: `{data: 1, fsdp: -1}`; sharding rules: overrides only);
- `Overlay` (a dict subclass naming a `schema` dataclass) keeps only the keys given, each checked
  against the schema's field types, for sections merged with others before use (`data` under
  `eval.data`); `.build(**extra)` makes the schema instance.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; raised before anything is built or compiled."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(tp, value, path: str = ""):
    """`value` (YAML data) as type `tp`: a dataclass, a class with `from_config`, an Overlay, ..."""
    return _coerce(tp, value, path)


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    parse = getattr(tp, "from_config", None) if isinstance(tp, type) else None
    if parse is not None:  # checked before the dataclass case: such a section has its own YAML form
        return value if isinstance(value, tp) else parse(value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and args and args[0] is str:  # one string for a list of strings
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string: accept numeric strings for float fields.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls, d: dict | None, path: str = ""):
    """Builds dataclass `cls` from dict `d`, recursively, validating keys and types."""
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = path or "config"
    _check_keys(list(fields), d, where)
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING is f.default_factory]
    missing = [n for n in required if n not in d]
    if missing:
        raise ConfigError(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(_join(path, m) for m in missing)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, _join(path, name))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        parts = str(e).split("; ")
        # A class check naming its fields ("lr=-1: must be >= 0; eps=0: ...") reads as full keys.
        if path and all(any(m.startswith(f"{name}=") for name in fields) for m in parts):
            raise ConfigError("; ".join(f"{path}.{m}" for m in parts)) from None
        raise ConfigError(f"{where}: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(valid, keys, where: str) -> None:
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} in "
            f"{where}; valid keys: {', '.join(valid)}"
        )


class Overlay(dict):
    """A section given as some of the keys of dataclass `schema` (set by a subclass), each checked
    against its field's type at load; the rest keep their defaults when `build` makes the instance.
    It stays a dict (and `to_dict` writes only the keys given) because such a section is merged with
    another before use: `eval.data` over `data`, the batch size from the rollout section."""

    schema: typing.ClassVar[type]

    @classmethod
    def from_config(cls, value, path: str):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping for {cls.schema.__name__}, got {value!r}")
        _check_keys([f.name for f in dataclasses.fields(cls.schema) if f.init], value, path or "config")
        hints = typing.get_type_hints(cls.schema)
        return cls({k: _coerce(hints[k], v, _join(path, k)) for k, v in value.items()})

    def build(self, path: str = "", **extra):
        """The schema instance of these keys (and `extra`), through `from_dict`."""
        return from_dict(self.schema, {**self, **extra}, path)


def to_dict(obj) -> Any:
    """A plain, YAML/JSON-serialisable dict of a config tree."""
    if hasattr(obj, "to_config"):
        return to_dict(obj.to_config())
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` sets d['a']['b']['c'] = yaml.safe_load(value)."""
    out = yaml.safe_load(yaml.safe_dump(d)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_yaml(path: str) -> dict:
    """A YAML mapping; a `configs/...` path missing here is read from the package's bundled configs."""
    from tgpo_jax.bundled import resolve_config

    path = resolve_config(path)
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return d or {}
