"""effml.report.stats: Student-t quantiles, t-intervals on the mean, power-law fits, number formatting."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from effml.report.stats import best_by_mean, fit_power_law, format_mean_spread, format_number, mean_interval, t_critical

# Two-sided critical values from published Student-t tables (3 decimals).
PUBLISHED_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 20: 2.086, 30: 2.042}
PUBLISHED_99 = {1: 63.657, 2: 9.925, 3: 5.841, 5: 4.032, 10: 3.169, 30: 2.750}


@pytest.mark.parametrize(("dof", "expected"), sorted(PUBLISHED_95.items()))
def test_t_critical_matches_published_95(dof: int, expected: float) -> None:
    assert t_critical(0.95, dof) == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize(("dof", "expected"), sorted(PUBLISHED_99.items()))
def test_t_critical_matches_published_99(dof: int, expected: float) -> None:
    assert t_critical(0.99, dof) == pytest.approx(expected, abs=6e-4)


def test_t_critical_tends_to_normal_quantile() -> None:
    # Normal two-sided quantiles: 1.95996 (95%), 2.57583 (99%).
    assert t_critical(0.95, 10**6) == pytest.approx(1.959966, abs=1e-4)
    assert t_critical(0.99, 10**6) == pytest.approx(2.575832, abs=1e-4)


@pytest.mark.parametrize("confidence", [0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_t_critical_exact_closed_forms(confidence: float) -> None:
    # dof = 1 is the Cauchy distribution: P(|T| <= t) = (2/pi) atan(t)  =>  t = tan(pi c / 2).
    assert t_critical(confidence, 1) == pytest.approx(math.tan(math.pi * confidence / 2), rel=1e-9)
    # dof = 2: P(|T| <= t) = t / sqrt(2 + t^2)  =>  t = c sqrt(2 / (1 - c^2)).
    assert t_critical(confidence, 2) == pytest.approx(confidence * math.sqrt(2 / (1 - confidence**2)), rel=1e-9)


def test_t_critical_is_monotone() -> None:
    by_dof = [t_critical(0.95, dof) for dof in (1, 2, 3, 5, 8, 13, 50, 200)]
    assert all(a > b for a, b in itertools.pairwise(by_dof))
    by_confidence = [t_critical(c, 4) for c in (0.5, 0.8, 0.9, 0.95, 0.99)]
    assert all(a < b for a, b in itertools.pairwise(by_confidence))


@pytest.mark.parametrize(("confidence", "dof"), [(0.0, 3), (1.0, 3), (1.5, 3), (0.95, 0), (0.95, 2.5), (0.95, True)])
def test_t_critical_rejects_bad_input(confidence: float, dof: int) -> None:
    with pytest.raises(ValueError):
        t_critical(confidence, dof)


def test_mean_interval_hand_computed() -> None:
    # [1, 2, 3, 4]: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; t(0.95, 3) = 3.182.
    interval = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.mean == 2.5
    assert interval.std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert interval.n == 4
    half = 3.182 * math.sqrt(5 / 3) / 2
    assert interval.low == pytest.approx(2.5 - half, abs=1e-3)
    assert interval.high == pytest.approx(2.5 + half, abs=1e-3)
    assert interval.half_width == pytest.approx(half, abs=1e-3)


def test_mean_interval_agrees_with_statistics_module() -> None:
    rng = random.Random(3)
    values = [rng.gauss(1.0, 0.3) for _ in range(7)]
    interval = mean_interval(values, confidence=0.99)
    assert interval.mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert interval.std == pytest.approx(statistics.stdev(values), rel=1e-12)
    half = t_critical(0.99, 6) * statistics.stdev(values) / math.sqrt(7)
    assert (interval.low, interval.high) == pytest.approx((interval.mean - half, interval.mean + half), rel=1e-12)


def test_mean_interval_covers_the_true_mean_at_the_stated_rate() -> None:
    rng = random.Random(0)
    trials = 4000
    # Independent draws per trial (three seeds, as in a recipe); binomial sd at 4000 trials is about 0.005.
    covered = 0
    for _ in range(trials):
        interval = mean_interval([rng.gauss(5.0, 2.0) for _ in range(3)], 0.9)
        covered += interval.low <= 5.0 <= interval.high
    assert covered / trials == pytest.approx(0.9, abs=0.02)


def test_mean_interval_single_value_and_constant_values() -> None:
    single = mean_interval([2.0])
    assert single.mean == 2.0 and single.n == 1 and math.isnan(single.std)
    assert single.low == -math.inf and single.high == math.inf
    constant = mean_interval([3.0, 3.0, 3.0])
    assert (constant.low, constant.high, constant.std) == (3.0, 3.0, 0.0)


def test_mean_interval_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(TypeError):
        mean_interval(["a", "b"])  # type: ignore[list-item]


def test_fit_power_law_recovers_exact_exponent() -> None:
    xs = [1e3, 4e3, 1.6e4, 6.4e4, 2.56e5]
    a, alpha = fit_power_law(xs, [7.5 * x**-0.34 for x in xs])
    assert a == pytest.approx(7.5, rel=1e-10)
    assert alpha == pytest.approx(0.34, rel=1e-10)


def test_fit_power_law_is_scale_covariant() -> None:
    # Rescaling y by k multiplies a by k and leaves alpha unchanged; rescaling x by s multiplies a by s^alpha.
    rng = random.Random(1)
    xs = [10.0, 30.0, 100.0, 300.0]
    ys = [2.0 * x**-0.5 * math.exp(rng.gauss(0, 0.05)) for x in xs]
    a, alpha = fit_power_law(xs, ys)
    a_y, alpha_y = fit_power_law(xs, [3.0 * y for y in ys])
    a_x, alpha_x = fit_power_law([5.0 * x for x in xs], ys)
    assert (a_y, alpha_y) == pytest.approx((3.0 * a, alpha), rel=1e-10)
    assert (a_x, alpha_x) == pytest.approx((a * 5.0**alpha, alpha), rel=1e-10)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([1.0], [1.0], "at least 2"),
        ([1.0, 2.0], [1.0], "same length"),
        ([1.0, -2.0], [1.0, 1.0], "positive"),
        ([1.0, 2.0], [0.0, 1.0], "positive"),
        ([2.0, 2.0], [1.0, 3.0], "equal"),
    ],
)
def test_fit_power_law_rejects_bad_input(x: list[float], y: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_format_mean_spread_rounds_to_the_spread() -> None:
    assert format_mean_spread(2.12345, 0.01234) == "2.123 ± 0.012"
    assert format_mean_spread(2.12345, 0.1234) == "2.12 ± 0.12"
    assert format_mean_spread(1234.5, 56.7) == "1234 ± 57"
    assert format_mean_spread(0.5, float("nan")) == "0.5"
    assert format_mean_spread(3.25, 0.0) == "3.25"
    # exponent notation keeps the mean to the spread's precision (3 digits read 1.23e+06, far off a 1.2344e+06 bound)
    assert format_mean_spread(1234567.0, 250.0) == "1.23457e+06 ± 2.5e+02"
    assert format_mean_spread(0.000123456, 2.5e-8) == "0.000123456 ± 2.5e-08"


def test_mean_interval_of_values_near_the_float_limit_does_not_overflow() -> None:
    interval = mean_interval([1.5e308, 1.6e308])
    assert interval.mean == pytest.approx(1.55e308) and interval.low < interval.mean < interval.high


def test_format_number_significant_digits() -> None:
    assert format_number(0.0496321) == "0.04963"
    assert format_number(2.0) == "2"
    assert format_number(12384.4) == "12384"
    assert format_number(1.5e-7) == "1.5e-07"
    assert format_number(7) == "7"


def test_best_by_mean_compares_on_common_seeds_ranks_diverged_last_and_keeps_the_first_of_a_tie() -> None:
    # b alone has seed 2, a lucky one: on the common seeds 0 and 1 a is better
    values = {"a": {"0": 1.0, "1": 1.0, "2": 1.0}, "b": {"0": 1.1, "1": 1.1}, "c": {"0": 1.2, "1": 1.2, "2": -9.0}}
    assert best_by_mean(values, "lower") == "a" and best_by_mean(values, "higher") == "c"
    assert best_by_mean({"x": {"0": 1.0}, "y": {"1": 0.5}}, "lower") == "y"  # no common seed: each on its own
    assert best_by_mean({"x": {"0": math.nan}, "y": {"0": 5.0}}, "lower") == "y"
    assert best_by_mean({"x": {"0": math.inf}, "y": {"0": 5.0}}, "higher") == "y"
    assert best_by_mean({"x": {"0": 1.0}, "y": {"0": 1.0}}, "higher") == "x"
    with pytest.raises(ValueError, match="better"):
        best_by_mean(values, "smaller")
