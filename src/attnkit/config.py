"""Frozen-dataclass configs: building from dicts, dotted overrides, validation, JSON round trip.

Every config in attnkit is a frozen dataclass. :func:`from_dict` builds one from plain data,
recursing into nested dataclass fields and rejecting unknown keys with the nearest valid name;
:func:`apply_overrides` applies ``--set key.sub=value`` strings to a plain dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from attnkit.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: typing.Iterable[str]) -> ConfigError:
    """A ConfigError for an unknown name, listing the choices and suggesting the nearest."""
    choices = sorted(choices)
    return ConfigError(f"unknown {kind} '{name}'{suggest(name, choices)}; choose from: "
                       + ", ".join(choices))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert) a plain value against a field's type annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}"
                              + suggest(str(value), map(str, allowed)))
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{where}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond the float range
                number = math.inf
            if not math.isfinite(number):  # JSON's NaN / Infinity, or an inf from Python
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; unknown keys raise with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise unknown(f"config key in {cls.__name__}", prefix + key,
                          [prefix + k for k in fields])
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain JSON-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, true/false, null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str],
                    open_sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (a new dict; input untouched).

    Keys must exist, except directly inside an ``open_sections`` mapping (e.g. ``arch``, whose
    keys the model family's own config validates later).
    """
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                raise unknown("config section", ".".join(parts[: i + 1]),
                              [k for k, v in node.items() if isinstance(v, dict)])
            node = child
        if parts[-1] not in node and ".".join(parts[:-1]) not in open_sections:
            raise unknown("config key", key, [".".join([*parts[:-1], k]) for k in node])
        node[parts[-1]] = parse_value(raw)
    return out


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON config file with a one-line error for a missing or malformed file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data
