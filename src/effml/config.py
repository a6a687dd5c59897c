"""Typed, validated configuration: dataclass configs, `--set a.b=value` overrides, and plain-dict round trips.

A config is a (possibly nested) dataclass whose `__post_init__` validates its own fields with the `check_*` helpers
below, so an invalid config cannot be constructed. Overrides are parsed by the annotated type of the field they
name; an unknown key lists the valid keys, and a bad value names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_choice",
    "check_distinct",
    "check_positive",
    "check_range",
    "config_from_dict",
    "config_to_dict",
    "dotted_keys",
]

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value or override is invalid; the message says which and how to fix it."""


def check_positive(owner: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number > 0 (or ≥ 0 with ``allow_zero``)."""
    if not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} = {value!r} is not a finite number; give a finite value.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(f"{owner}.{name} = {value!r} is out of range: it must be {bound}.")


def check_range(owner: str, name: str, value: float, low: float, high: float) -> None:
    """Raise ConfigError unless low ≤ value ≤ high."""
    if not low <= value <= high:
        raise ConfigError(f"{owner}.{name} = {value!r} is out of range: it must lie in [{low}, {high}].")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{owner}.{name} = {value!r} is not allowed: choose one of {', '.join(map(repr, choices))}.")


def check_distinct(owner: str, name: str, values: Iterable[Any], *, key: Callable[[Any], Any] | None = None,
                   why: str = "each entry is its own arm, so a repeat would run it twice under one name; list each "
                              "once") -> None:
    """Raise ConfigError if two entries of the list field ``values`` are equal, or, with ``key``, equal under it
    (two spellings of one variant, two learning rates printed alike in arm names); ``why`` says why that is wrong
    and what to do."""
    values = list(values)
    seen: dict[Any, Any] = {}
    for value in values:
        same = key(value) if key is not None else value
        if same in seen:
            first = seen[same]
            repeat = f"{value!r} twice" if first == value else f"{first!r} and {value!r}, which are the same ({same!r})"
            raise ConfigError(f"{owner}.{name} = {values!r} lists {repeat}: {why}.")
        seen[same] = value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dotted_keys(config: Any, prefix: str = "") -> list[str]:
    """All overridable keys of a dataclass config, nested ones as ``outer.inner``."""
    keys = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            keys.extend(dotted_keys(value, f"{prefix}{field.name}."))
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parse(text: str, tp: Any, key: str) -> Any:
    """Parse the string ``text`` as a value of the annotated type ``tp``."""
    tp, optional = _strip_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin in (list, tuple, Sequence) or tp in (list, tuple):
            args = typing.get_args(tp)
            item_type = args[0] if args else str
            stripped = text.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                try:
                    items = json.loads(stripped)
                except json.JSONDecodeError:  # [a,b] with bare words: the same as a,b
                    items = [part.strip() for part in stripped[1:-1].split(",") if part.strip()]
                parsed = [_parse(json.dumps(i) if not isinstance(i, str) else i, item_type, key) for i in items]
            else:
                parsed = [_parse(part.strip(), item_type, key) for part in stripped.split(",") if part.strip()]
            return tuple(parsed) if origin is tuple or tp is tuple else parsed
        if origin is dict or tp is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, json.JSONDecodeError):
        pass
    else:
        raise ConfigError(f"--set {key}: fields of type {tp!r} cannot be overridden from the command line.")
    raise ConfigError(
        f"--set {key}={text!r}: expected a value of type {getattr(tp, '__name__', tp)}"
        f"{' (or none)' if optional else ''}; got {text!r}."
    )


def apply_overrides(config: C, overrides: Sequence[str]) -> C:
    """Return a copy of ``config`` with ``key=value`` overrides applied (dotted keys reach nested configs).

    The overrides are applied together, each (nested) config rebuilt once through its dataclass constructor, so every
    override is validated but their order does not matter: ``--set train.steps=10 --set train.warmup_steps=2`` works
    from a preset with 1000 warm-up steps. A key given twice takes its last value. The original is unchanged.
    """
    valid = dotted_keys(config)
    values: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not of the form key=value (for example --set train.lr=3e-4).")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise ConfigError(f"--set {key}: unknown key. Valid keys are: {', '.join(valid)}.")
        values[key] = text
    return _replace_dotted(config, values, "") if values else config


def _replace_dotted(config: Any, values: dict[str, str], prefix: str) -> Any:
    """``config`` with ``values`` (dotted key relative to ``config`` → text) applied in one constructor call per level;
    the caller checked that every dotted key exists. ``prefix`` names ``config`` in messages ("train.")."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    for key, text in values.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = text
        else:
            changes[head] = _parse(text, _field_types(type(config))[head], prefix + key)
    for head, inner in nested.items():
        changes[head] = _replace_dotted(getattr(config, head), inner, f"{prefix}{head}.")
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        given = " ".join(f"--set {prefix}{key}={text!r}" for key, text in values.items())
        raise ConfigError(f"{given} is invalid: {error}") from error


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable nested dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a (nested) dataclass config from ``config_to_dict`` output, validating every field."""
    hints = _field_types(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value = data[field.name]
        tp, _ = _strip_optional(hints[field.name])
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            value = config_from_dict(tp, value)
        elif (typing.get_origin(tp) is tuple or tp is tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[field.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)} in a saved config.")
    return cls(**kwargs)
