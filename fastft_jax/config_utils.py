"""Mapping YAML/keyword dicts onto frozen dataclasses, with errors that name the nearest valid key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping

from convert.errors import ConfigError


def nearest_key_hint(key: str, valid: list[str]) -> str:
    nearest = difflib.get_close_matches(str(key), valid, n=1)
    return f"; did you mean `{nearest[0]}`?" if nearest else ""


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin is dict or expected is dict:
        return isinstance(value, Mapping)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def type_name(expected: Any) -> str:
    """'int', 'str or null', 'tuple[str, ...]': the type as a YAML user reads it."""
    if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
        return " or ".join(type_name(option) for option in typing.get_args(expected))
    if expected is type(None):
        return "null"
    return getattr(expected, "__name__", str(expected)) if typing.get_origin(expected) is None else str(expected)


def _wants_float(expected: Any) -> bool:
    options = typing.get_args(expected) if typing.get_origin(expected) in (typing.Union, types.UnionType) else (expected,)
    return float in options and int not in options


def dataclass_from_dict(cls: type, values: Mapping[str, Any], where: str, *, accepted_without_effect: frozenset = frozenset()):
    """Build cls from a mapping: unknown keys and wrong types raise a ConfigError naming the key
    (and, for an unknown key, the nearest valid one). YAML's 2 for a float field becomes 2.0."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key in accepted_without_effect:
            continue
        if key not in fields:
            raise ConfigError(
                f"{where}.{key}: unknown key{nearest_key_hint(key, list(fields))} Valid keys: {', '.join(fields)}"
            )
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where}.{key}: expected {type_name(hints[key])}, got {type(value).__name__} {value!r}")
        if _wants_float(hints[key]) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typing.get_origin(hints[key]) is tuple or (
            typing.get_origin(hints[key]) in (typing.Union, types.UnionType)
            and isinstance(value, list)
        ):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
