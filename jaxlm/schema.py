"""Typed config sections: one dataclass per room, one source of truth for defaults and checks.

Every section of the experiment config is a frozen dataclass whose fields are declared with
`field(default, help, ...)`. From it we derive

* the user-facing `ml_collections.ConfigDict` (`to_config_dict`), which `launch.py` loads and
  overrides from the command line, and
* the validated, hashable object the code runs on (`from_config_dict`), which rejects unknown
  keys (with a "did you mean"), wrong types and out-of-range values in one line naming the
  field, its value and what is allowed.

Flax modules take the frozen dataclasses as attributes, so they must stay hashable: use tuples,
never lists or dicts, for sequence-valued fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line naming the field."""


def field(default: Any, help: str, *, choices: Iterable[Any] | None = None,
          min: float | None = None, max: float | None = None, min_exclusive: bool = False):
    """Declares a config field with its one-line `help` and optional allowed values/range."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "min": min, "max": max, "min_exclusive": min_exclusive}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls):
    """Decorator: a frozen, hashable config section."""
    return dataclasses.dataclass(frozen=True)(cls)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(tp) -> Any | None:
    """Returns T for Optional[T] / T | None, else None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def to_config_dict(obj) -> ml_collections.ConfigDict:
    """Dataclass instance -> ConfigDict; Optional fields that are None become typed placeholders
    so they can still be overridden from the command line."""
    out = {}
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_config_dict(value)
        elif value is None:
            inner = _optional_inner(hints[f.name])
            base = typing.get_origin(inner) or inner
            out[f.name] = ml_collections.config_dict.placeholder(base if isinstance(base, type) else object)
        else:
            out[f.name] = value
    return ml_collections.ConfigDict(out)


def describe(cls, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) for every field, recursively; used for docs and --help."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, f.metadata.get("help", "")))
    return rows


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks `value` against annotation `tp`; returns it converted (list->tuple, int->float)."""
    if tp is Any:
        return value
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, path)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}={value!r}: expected one of {list(typing.get_args(tp))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise ConfigError(f"{path}={value!r}: expected a tuple")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}={value!r}: expected a tuple of {len(args)} items")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))) \
            if args else tuple(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a float")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}={value!r}: expected an int")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected a bool (True/False)")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}={value!r}: expected {_type_name(tp)}")
    return value


def _check_range(value, meta, path):
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}={value!r}: expected one of {list(choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{path}=nan: expected a number")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{path}={value!r}: expected {op} {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{path}={value!r}: expected <= {hi}")


def unknown_key_error(key: str, known: Iterable[str], path: str) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = (f"; did you mean '{path}{close[0]}'?" if close
            else f"; known fields: {', '.join(known)}")
    return ConfigError(f"unknown config field '{path}{key}'{hint}")


def from_config_dict(cls, cd: Any, path: str = ""):
    """ConfigDict (or plain dict) -> validated frozen dataclass `cls`.

    Raises ConfigError naming the dotted field for unknown keys, type mismatches and values out
    of range. Missing keys take the dataclass default.
    """
    if cd is None:
        cd = {}
    if isinstance(cd, ml_collections.ConfigDict):
        cd = cd.to_dict()
    if not isinstance(cd, dict):
        raise ConfigError(f"{path.rstrip('.') or 'config'}={cd!r}: expected a section (dict)")
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in cd:
        if key not in names:
            raise unknown_key_error(key, names, path)
    hints = _hints(cls)
    kwargs = {}
    defaults = cls()
    for name, f in names.items():
        if name not in cd:
            continue
        value = cd[name]
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_config_dict(type(default), value, f"{path}{name}.")
            continue
        value = _coerce(value, hints[name], path + name)
        if value is not None:
            _check_range(value, f.metadata, path + name)
            if (isinstance(value, float) and math.isinf(value)
                    and not (isinstance(default, float) and math.isinf(default))):
                raise ConfigError(f"{path}{name}={value!r}: expected a finite number")
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def replace(obj, **changes):
    """dataclasses.replace that re-runs the section's cross-field validation."""
    new = dataclasses.replace(obj, **changes)
    check = getattr(new, "validate", None)
    if check is not None:
        check()
    return new
