"""Small-sample statistics for claim verdicts, and how the report prints numbers.

* ``t_critical`` — the two-sided Student-t quantile, computed (not looked up) by inverting the t CDF, whose tail is
  a regularized incomplete beta function: for t ≥ 0, P(T > t) = ½ · I_{ν/(ν+t²)}(ν/2, ½). I_x(a, b) is evaluated
  with its continued fraction (Abramowitz & Stegun 26.5.8) by the modified Lentz method.
* ``mean_interval`` — mean, sample standard deviation and the t-interval on the mean of a handful of seeds.
* ``fit_power_law`` — least-squares fit of y ≈ a·x^(−α) in log-log space (scaling-law exponents).
* ``best_by_mean`` — which of several candidates (a recipe's variants, learning rates) has the best mean over seeds.
* ``format_number`` / ``format_mean_spread`` — numbers to sensible significant digits for tables and evidence text.

Pure standard library: importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "Interval",
    "t_critical",
    "mean_interval",
    "fit_power_law",
    "best_by_mean",
    "format_number",
    "format_mean_spread",
]

_CF_MAX_ITERATIONS = 100_000
_CF_EPS = 1e-15
_TINY = 1e-300


def _incomplete_beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued-fraction part of I_x(a, b) (converges fast for x < (a+1)/(a+b+2))."""
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _CF_MAX_ITERATIONS + 1):
        two_m = 2 * m
        # Even step of the fraction: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)).
        coeff = m * (b - m) * x / ((a + two_m - 1.0) * (a + two_m))
        d = 1.0 + coeff * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + coeff / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        # Odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        coeff = -(a + m) * (a + b + m) * x / ((a + two_m) * (a + two_m + 1.0))
        d = 1.0 + coeff * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + coeff / c
        c = c if abs(c) > _TINY else _TINY
        step = d * c
        h *= step
        if abs(step - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _incomplete_beta_continued_fraction(a, b, x) / a
    # Symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction in its fast-converging region.
    return 1.0 - front * _incomplete_beta_continued_fraction(b, a, 1.0 - x) / b


def _t_two_sided_tail(t: float, dof: int) -> float:
    """P(|T| > t) for Student's t with ``dof`` degrees of freedom, t ≥ 0."""
    return _regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))


def t_critical(confidence: float, dof: int) -> float:
    """Two-sided Student-t critical value: the t with P(|T| ≤ t) = ``confidence`` for ``dof`` degrees of freedom.

    Examples: ``t_critical(0.95, 2) ≈ 4.303``, ``t_critical(0.95, 10) ≈ 2.228``; it tends to the normal 1.960 as
    ``dof`` grows. Found by bisection on the t CDF (monotone in t) to about 1e-12 relative precision.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"t_critical: confidence must be a number strictly between 0 and 1 (e.g. 0.95), got {confidence!r}."
        )
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ValueError(
            f"t_critical: dof (degrees of freedom) must be an integer ≥ 1 — for n samples use n - 1 — got {dof!r}."
        )
    return _t_critical_checked(float(confidence), dof)


@lru_cache(maxsize=256)
def _t_critical_checked(confidence: float, dof: int) -> float:
    alpha = 1.0 - confidence
    low, high = 0.0, 1.0
    while _t_two_sided_tail(high, dof) > alpha:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _t_two_sided_tail(mid, dof) > alpha:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with sample standard deviation ``std`` and the t-interval [``low``, ``high``] on the mean.

    With a single value the spread is unknown: ``std`` is NaN and the interval is (−∞, +∞).
    """

    mean: float
    std: float
    n: int
    low: float
    high: float
    confidence: float

    @property
    def half_width(self) -> float:
        """Half the width of the confidence interval (``inf`` when n = 1)."""
        return 0.5 * (self.high - self.low)


def _as_finite_floats(values: Sequence[float], what: str, caller: str) -> list[float]:
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{caller}: {what} must be a sequence of numbers, got {values!r}.") from exc
    bad = [v for v in floats if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"{caller}: {what} contains non-finite values {bad}; drop diverged measurements before summarising."
        )
    return floats


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean, sample std (ddof = 1) and the two-sided t-interval on the mean: mean ± t_{conf, n−1} · std / √n."""
    floats = _as_finite_floats(values, "values", "mean_interval")
    n = len(floats)
    if n == 0:
        raise ValueError("mean_interval: no values given; pass at least one measurement.")
    try:
        mean = math.fsum(floats) / n
    except OverflowError:  # values near the float limit: their sum overflows, their n-th parts do not
        mean = math.fsum(v / n for v in floats)
    if n == 1:
        return Interval(mean, math.nan, 1, -math.inf, math.inf, confidence)
    # Deviations are scaled by the largest one before squaring, so that values beyond ~1e154 (a diverged model's
    # error) do not overflow.
    spread = max(abs(v - mean) for v in floats)
    std = spread * math.sqrt(math.fsum(((v - mean) / spread) ** 2 for v in floats) / (n - 1)) if spread else 0.0
    half = t_critical(confidence, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half, confidence)


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Fit y ≈ a · x^(−alpha) by ordinary least squares of log y on log x; returns ``(a, alpha)``.

    Needs at least two points with positive x and y and at least two distinct x values.
    """
    xs = _as_finite_floats(x, "x", "fit_power_law")
    ys = _as_finite_floats(y, "y", "fit_power_law")
    if len(xs) != len(ys):
        raise ValueError(f"fit_power_law: x and y must have the same length, got {len(xs)} and {len(ys)}.")
    if len(xs) < 2:
        raise ValueError(f"fit_power_law: needs at least 2 points to fit a power law, got {len(xs)}.")
    non_positive = [(xi, yi) for xi, yi in zip(xs, ys, strict=True) if xi <= 0 or yi <= 0]
    if non_positive:
        raise ValueError(
            f"fit_power_law: a power law is fitted in log-log space, so x and y must be positive; "
            f"got non-positive points {non_positive}. Remove them or fit a shifted quantity."
        )
    log_x = [math.log(v) for v in xs]
    log_y = [math.log(v) for v in ys]
    mean_lx = math.fsum(log_x) / len(log_x)
    mean_ly = math.fsum(log_y) / len(log_y)
    sxx = math.fsum((lx - mean_lx) ** 2 for lx in log_x)
    if sxx == 0.0:
        raise ValueError(f"fit_power_law: all x values are equal ({xs[0]}); the exponent is undetermined.")
    sxy = math.fsum((lx - mean_lx) * (ly - mean_ly) for lx, ly in zip(log_x, log_y, strict=True))
    slope = sxy / sxx
    return math.exp(mean_ly - slope * mean_lx), -slope


def best_by_mean(values: Mapping[Hashable, Mapping[str, float]], better: str) -> Hashable:
    """The candidate whose values have the best mean: the lowest for ``better="lower"``, the highest for "higher".

    ``values``: candidate → {seed: value}, at least one candidate, each with at least one seed. Means are taken over
    the seeds every candidate has, so that in a partial run one lucky seed cannot make a candidate best (over each
    candidate's own seeds when they share none). A non-finite mean (a diverged run) ranks last; ties go to the
    candidate listed first. Recipes choose on validation values and report the choice on test values, so that the
    choice does not inflate what is reported (the winner's curse).
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"best_by_mean: better must be 'lower' or 'higher', got {better!r}.")
    if not values or not all(values.values()):
        raise ValueError(f"best_by_mean needs at least one candidate and one value per candidate, got {values!r}.")
    common = set.intersection(*(set(seeds) for seeds in values.values()))
    sign = -1.0 if better == "lower" else 1.0

    def score(candidate: Hashable) -> float:
        seeds = values[candidate]
        mean = math.fsum(value for seed, value in seeds.items() if not common or seed in common) / len(
            common or seeds)
        return sign * mean if math.isfinite(mean) else -math.inf

    return max(values, key=score)


def format_number(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits; large values as whole numbers, exponents only when tiny or huge."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if 10**digits <= abs(value) < 1e15:
        return f"{value:.0f}"  # 12384.0 reads better than 1.238e+04
    return f"{value:.{digits}g}"


def format_mean_spread(mean: float, spread: float, spread_digits: int = 2) -> str:
    """``mean ± spread`` with the spread to ``spread_digits`` significant digits and the mean to the same decimal.

    ``2.12345, 0.01234 → "2.123 ± 0.012"``. Without a usable spread (NaN, infinite or 0) only the mean is shown.
    """
    if not math.isfinite(mean):
        return str(mean)
    if not math.isfinite(spread) or spread <= 0.0:
        return format_number(mean)
    magnitude = max(abs(mean), spread)
    if magnitude >= 1e6 or magnitude < 1e-3:  # exponent notation, the mean to the spread's last digit
        mean_digits = spread_digits + max(0, math.floor(math.log10(magnitude)) - math.floor(math.log10(spread)))
        return f"{mean:.{max(3, mean_digits)}g} ± {spread:.{spread_digits}g}"
    decimals = max(0, spread_digits - 1 - math.floor(math.log10(spread)))
    return f"{mean:.{decimals}f} ± {spread:.{decimals}f}"
