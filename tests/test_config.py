"""Typed overrides and validation of dataclass configs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from effml.config import (ConfigError, apply_overrides, check_distinct, check_positive, config_from_dict,
                          config_to_dict, dotted_keys)


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    clip: float | None = None

    def __post_init__(self) -> None:
        check_positive("inner", "steps", self.steps)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    sizes: tuple[str, ...] = ("a", "b")
    widths: tuple[int, ...] = (1, 2)
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_overrides_are_parsed_by_field_type_and_leave_the_original_alone() -> None:
    base = Outer()
    new = apply_overrides(base, ["inner.lr=0.5", "inner.steps=7", "flag=true", "sizes=p,q,r", "widths=[3, 4]",
                                 "inner.clip=none", "name=hello"])
    assert new.inner == Inner(lr=0.5, steps=7, clip=None)
    assert (new.flag, new.sizes, new.widths, new.name) == (True, ("p", "q", "r"), (3, 4), "hello")
    assert base == Outer()
    assert apply_overrides(base, ["inner.clip=2.5"]).inner.clip == 2.5
    for spelling in ("[p,q]", '["p", "q"]', "p,q", "[p, q]"):  # bracketed bare words read as the plain list
        assert apply_overrides(base, [f"sizes={spelling}"]).sizes == ("p", "q")


def test_unknown_key_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError) as error:
        apply_overrides(Outer(), ["inner.lrr=1"])
    message = str(error.value)
    assert "inner.lrr" in message and "inner.lr" in message and "inner.steps" in message and "widths" in message
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(Outer(), ["inner=3"])  # a nested config is not a value


def test_wrong_type_and_out_of_range_say_which_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"inner\.steps.*int"):
        apply_overrides(Outer(), ["inner.steps=ten"])
    with pytest.raises(ConfigError, match=r"steps = -1 .*> 0"):
        apply_overrides(Outer(), ["inner.steps=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Outer(), ["inner.steps"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_positive_checks_reject_non_finite_numbers(value: float) -> None:
    """NaN compares false with every bound, so a plain range test let it through (grad_clip=nan disabled clipping)."""
    with pytest.raises(ConfigError, match="not a finite number"):
        check_positive("train", "grad_clip", value, allow_zero=True)


def test_dict_round_trip_rebuilds_an_equal_validated_config() -> None:
    config = apply_overrides(Outer(), ["sizes=u,v", "inner.lr=0.25"])
    assert config_from_dict(Outer, config_to_dict(config)) == config
    assert dotted_keys(config) == ["name", "sizes", "widths", "flag", "inner.lr", "inner.steps", "inner.clip"]
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict(Outer, {"bogus": 1})


@dataclass(frozen=True)
class Schedule:
    steps: int = 100
    warmup: int = 50

    def __post_init__(self) -> None:
        if self.warmup > self.steps:
            raise ConfigError(f"warmup {self.warmup} exceeds steps {self.steps}")


@dataclass(frozen=True)
class Run:
    seeds: int = 1
    schedule: Schedule = field(default_factory=Schedule)


def test_overrides_are_validated_together_in_any_order_and_the_last_value_wins() -> None:
    for order in (["schedule.steps=10", "schedule.warmup=2"], ["schedule.warmup=2", "schedule.steps=10"]):
        assert apply_overrides(Run(), order).schedule == Schedule(steps=10, warmup=2)
    assert apply_overrides(Run(), ["seeds=2", "seeds=3"]).seeds == 3
    with pytest.raises(ConfigError, match="warmup 50 exceeds steps 10"):
        apply_overrides(Run(), ["schedule.steps=10"])


def test_distinct_check_names_the_repeat_and_entries_equal_under_a_key() -> None:
    check_distinct("recipe", "sizes", ("a", "b"))
    with pytest.raises(ConfigError, match=r"recipe\.sizes = \['a', 'b', 'a'\] lists 'a' twice: .*list each once"):
        check_distinct("recipe", "sizes", ("a", "b", "a"))
    with pytest.raises(ConfigError, match=r"lists 'RW' and 'rw', which are the same \('rw'\): one arm each"):
        check_distinct("recipe", "variants", ("RW", "lr", "rw"), key=str.lower, why="one arm each")
