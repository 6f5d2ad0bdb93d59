"""Typed, validated config trees from plain dicts (YAML via yaml.safe_load).

`from_dict(cls, d)` builds a (frozen) dataclass tree: an unknown key is an error listing the valid
keys, a wrong type is an error naming the dotted path, the expected type and the value found.
`apply_overrides(d, ["a.b=3", ...])` applies CLI `key=value` overrides (values parsed as YAML).
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


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
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
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
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
    unknown = sorted(set(d) - set(fields))
    where = path or "config"
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} in "
            f"{where}; valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
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


def to_dict(obj) -> Any:
    """A plain, YAML/JSON-serialisable dict of a config tree."""
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
