"""Specs as data: dataclasses (claims, plots) that round-trip through a JSON dict tagged with a ``kind`` field.

Shared by ``claims.py`` and ``plots.py`` so that results.json alone is enough to rebuild every claim and plot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, TypeVar

SpecT = TypeVar("SpecT", bound="Spec")


class Spec:
    """Mixin for a dataclass whose fields are JSON scalars or lists of them; ``kind`` names the concrete class."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict: ``{"kind": ..., <field>: <value>, ...}``."""
        out: dict[str, Any] = {"kind": self.kind}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    @classmethod
    def from_dict(cls: type[SpecT], data: dict[str, Any]) -> SpecT:
        """Rebuild the spec from ``to_dict()`` output; unknown or missing keys raise a ValueError naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict (from to_dict()), got {type(data).__name__}.")
        kind = data.get("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"{cls.__name__}.from_dict got a dict of kind {kind!r}; expected kind {cls.kind!r}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields) - {"kind"})
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown key(s) {unknown} in {data!r}; valid keys are {sorted(fields)} (plus 'kind')."
            )
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{cls.__name__}: missing required key(s) {missing} in {data!r}.")
        return cls(**{name: data[name] for name in fields if name in data})


def spec_from_dict(data: Any, registry: dict[str, type[Spec]], what: str) -> Spec:
    """Dispatch ``data`` to the class named by its ``kind`` field in ``registry``; ``what`` names the family."""
    if not isinstance(data, dict):
        raise TypeError(f"{what}_from_dict expects a dict with a 'kind' field, got {type(data).__name__}: {data!r}.")
    kind = data.get("kind")
    if kind not in registry:
        raise ValueError(
            f"{what}_from_dict: unknown {what} kind {kind!r} in {data!r}; known kinds are {sorted(registry)}. "
            f"The results file may come from a newer effml, or the 'kind' field was edited."
        )
    return registry[kind].from_dict(data)


def check_name(owner: str, field: str, value: Any) -> None:
    """A non-empty string (spec names, metric names, arm names)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{owner}: {field} must be a non-empty string, got {value!r}.")


def check_name_list(owner: str, field: str, value: Any, minimum: int) -> list[str]:
    """A list of at least ``minimum`` distinct non-empty strings; returned as a new list (tuples accepted)."""
    if not isinstance(value, (list, tuple)) or len(value) < minimum:
        raise ValueError(f"{owner}: {field} must be a list of at least {minimum} name(s), got {value!r}.")
    for name in value:
        check_name(owner, f"each of {field}", name)
    if len(set(value)) != len(value):
        raise ValueError(f"{owner}: {field} must be distinct, got {value!r}.")
    return list(value)


def check_choice(owner: str, field: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of a fixed set of strings."""
    if value not in choices:
        raise ValueError(f"{owner}: {field} must be one of {list(choices)}, got {value!r}.")


def check_number(owner: str, field: str, value: Any) -> None:
    """A finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {field} must be a finite number, got {value!r}.")


def check_confidence(owner: str, value: Any) -> None:
    """A confidence level strictly between 0 and 1."""
    check_number(owner, "confidence", value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{owner}: confidence must be strictly between 0 and 1 (e.g. 0.95), got {value!r}.")
