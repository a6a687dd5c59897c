"""A paper's claims as data, and their verdicts computed from the measurements across seeds.

A claim names a metric, the arms (or derived quantities) it is about, which direction is better and the margin that
counts. ``Claim.evaluate(results)`` reads the per-seed final metrics of the runs whose status is ``"complete"`` from
a results document (see ``effml.report``) and returns a ``ClaimResult`` whose verdict is

* ``holds`` — the whole confidence interval (Student-t, over seeds) is strictly on the good side of the
  margin/threshold,
* ``fails`` — the whole interval is strictly on the bad side,
* ``inconclusive`` — the interval straddles or touches it, fewer than two seeds were measured, or something was not
  measured. Touching counts as undecided so that a tie — every seed exactly on the margin, say a slope of 0 between
  integer-valued depths — never decides a claim worded "> 0", nor one worded "≥ 0" against it.

Evaluation never raises on an incomplete results document (interrupted runs must still render): what is missing is
named in the evidence text instead.

Kinds: ``Compare`` (paired per-seed improvement of one arm over a baseline), ``Monotone`` (a chain of Compares along
ordered arms), ``Threshold`` (one arm's values against a constant).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from effml.report._spec import (
    Spec,
    check_choice,
    check_confidence,
    check_name,
    check_name_list,
    check_number,
    spec_from_dict,
)
from effml.report.stats import Interval, format_mean_spread, format_number, mean_interval

__all__ = [
    "VERDICTS",
    "ClaimResult",
    "Claim",
    "Compare",
    "Monotone",
    "Threshold",
    "check_claim_list",
    "claim_from_dict",
    "evaluate_claims",
]

VERDICTS = ("holds", "fails", "inconclusive")
# What a premise's verdict was, as the evidence of a claim left undecided by it says: "needs 'X' to hold (it fails)"
_PREMISE_OUTCOME = {"holds": "it holds", "fails": "it fails", "inconclusive": "it is inconclusive"}
_DIRECTIONS = ("lower", "higher")


@dataclass(frozen=True)
class ClaimResult:
    """The verdict on one claim: ``verdict`` in ``VERDICTS``, a one-line ``evidence`` text, and its ``numbers``."""

    name: str
    kind: str
    statement: str
    verdict: str
    evidence: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "name": self.name,
            "kind": self.kind,
            "statement": self.statement,
            "verdict": self.verdict,
            "evidence": self.evidence,
            "numbers": dict(self.numbers),
        }


# --- reading measurements from a results document -------------------------------------------------------------


def seed_sort_key(seed: str) -> tuple[int, int, str]:
    """Order seeds numerically when they are integers ("2" before "10"), otherwise by name."""
    text = str(seed)
    try:
        return (0, int(text), text)
    except ValueError:
        return (1, 0, text)


def _find_entry(results: dict[str, Any], entry: str) -> dict[str, Any] | None:
    """The arm or derived quantity named ``entry`` (arms first), or None."""
    for section in ("arms", "derived"):
        table = results.get(section)
        if isinstance(table, dict) and isinstance(table.get(entry), dict):
            return table[entry]
    return None


def complete_metric_values(results: dict[str, Any], entry: str, metric: str) -> tuple[dict[str, float], str | None]:
    """Per-seed values of ``metric`` over the complete runs of arm/derived ``entry``, or ``({}, reason)``.

    A run counts when its status is ``"complete"`` (derived entries carry no status and always count). Values may be
    non-finite (a diverged run); callers decide what that means.
    """
    data = _find_entry(results, entry)
    if data is None:
        return {}, f"'{entry}' is not an arm or derived quantity of this run"
    runs = data.get("runs")
    runs = runs if isinstance(runs, dict) else {}
    complete = {
        str(seed): run
        for seed, run in runs.items()
        if isinstance(run, dict) and run.get("status", "complete") == "complete"
    }
    if not complete:
        unfinished = f" ({len(runs)} unfinished)" if runs else ""
        return {}, f"'{entry}' has no complete runs{unfinished}"
    values: dict[str, float] = {}
    for seed, run in complete.items():
        metrics = run.get("metrics")
        value = metrics.get(metric) if isinstance(metrics, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[seed] = float(value)
    if not values:
        return {}, f"'{metric}' is not recorded for '{entry}'"
    return values, None


def _non_finite(entry: str, values: dict[str, float], seeds: list[str]) -> list[str]:
    return [f"{entry} seed {seed}" for seed in seeds if not math.isfinite(values[seed])]


def _non_finite_text(where: list[str]) -> str:
    return f"non-finite values (a diverged run, or a quantity not reached) at {', '.join(where)}"


def _ci_text(interval: Interval, percent: bool = False, signed: bool = False) -> str:
    """``mean ± half-width (95% CI, n=3)``, optionally in percent and with an explicit + sign."""
    scale = 100.0 if percent else 1.0
    text = format_mean_spread(scale * interval.mean, scale * interval.half_width)
    if signed and not text.startswith("-"):
        text = "+" + text
    unit = " %" if percent else ""
    return f"{text}{unit} ({interval.confidence * 100:g}% CI, n={interval.n})"


def _mean_std_text(values: list[float]) -> str:
    summary = mean_interval(values)
    return format_mean_spread(summary.mean, summary.std)


def _interval_numbers(interval: Interval) -> dict[str, Any]:
    return {
        "mean": interval.mean,
        "std": interval.std,
        "half_width": interval.half_width,
        "low": interval.low,
        "high": interval.high,
        "n": interval.n,
        "confidence": interval.confidence,
    }


# --- claims ---------------------------------------------------------------------------------------------------


@dataclass
class Claim(Spec):
    """Base of all claims: a short ``name`` and the one-sentence ``statement`` a person reads.

    ``requires``: the name of a claim declared earlier that must hold for this one to be decided (a premise, e.g.
    "the baseline learns the task" before "the method is at least as good on it"); while it does not hold, this
    claim is reported *inconclusive*, with what was measured, by ``evaluate_claims``.
    """

    name: str
    statement: str
    requires: str | None = field(default=None, kw_only=True)

    def _check_common(self) -> None:
        check_name(self._owner, "name", self.name)
        if not isinstance(self.statement, str):
            raise ValueError(f"{self._owner}: statement must be a string (one sentence), got {self.statement!r}.")
        if self.requires is not None:
            check_name(self._owner, "requires", self.requires)

    @property
    def _owner(self) -> str:
        return f"{type(self).__name__} claim {self.name!r}"

    def evaluate(self, results: dict[str, Any]) -> ClaimResult:
        """The verdict on this claim from the measurements in ``results``."""
        raise NotImplementedError

    def _result(self, verdict: str, evidence: str, numbers: dict[str, Any] | None = None) -> ClaimResult:
        return ClaimResult(self.name, self.kind, self.statement, verdict, evidence, numbers or {})


def _check_results(results: Any) -> None:
    if not isinstance(results, dict):
        raise TypeError(f"Claim.evaluate expects the results document (a dict), got {type(results).__name__}.")


@dataclass
class Compare(Claim):
    """Arm beats baseline on ``metric`` by at least ``margin``, paired over the seeds both have.

    The per-seed improvement is ``d_s = baseline_s − arm_s`` for ``better="lower"`` (``arm_s − baseline_s`` for
    ``"higher"``), divided by ``|baseline_s|`` when ``relative``. Holds when the whole t-interval of mean(d) is
    > ``margin``, fails when it is entirely < ``margin`` (touching it: inconclusive, see the module docstring). A
    negative relative margin states a tolerance: ``better="lower", relative=True, margin=-0.05`` reads "at most 5%
    worse".
    """

    kind: ClassVar[str] = "compare"

    metric: str
    arm: str
    baseline: str
    better: str = "lower"
    margin: float = 0.0
    relative: bool = False
    confidence: float = 0.95

    def __post_init__(self) -> None:
        self._check_common()
        for field_name in ("metric", "arm", "baseline"):
            check_name(self._owner, field_name, getattr(self, field_name))
        if self.arm == self.baseline:
            raise ValueError(f"{self._owner}: arm and baseline are both {self.arm!r}; compare two different arms.")
        check_choice(self._owner, "better", self.better, _DIRECTIONS)
        check_number(self._owner, "margin", self.margin)
        if not isinstance(self.relative, bool):
            raise ValueError(f"{self._owner}: relative must be True or False, got {self.relative!r}.")
        check_confidence(self._owner, self.confidence)

    def _margin_text(self) -> str:
        if self.relative:
            return f"{format_number(100.0 * self.margin, 3)} %"
        return format_number(self.margin)

    def assess(self, results: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
        """``(verdict, headline, detail, numbers)``: the improvement vs the margin, then both arms' mean ± std."""
        _check_results(results)
        arm_values, arm_missing = complete_metric_values(results, self.arm, self.metric)
        base_values, base_missing = complete_metric_values(results, self.baseline, self.metric)
        numbers: dict[str, Any] = {"metric": self.metric, "arm": self.arm, "baseline": self.baseline}
        missing = [reason for reason in (arm_missing, base_missing) if reason]
        if missing:
            return "inconclusive", "not measured: " + "; ".join(missing), "", numbers
        seeds = sorted(set(arm_values) & set(base_values), key=seed_sort_key)
        numbers["seeds"] = seeds
        pair = f"{self.arm} vs {self.baseline} on {self.metric}"
        non_finite = _non_finite(self.arm, arm_values, seeds) + _non_finite(self.baseline, base_values, seeds)
        if non_finite:
            return "inconclusive", f"{pair}: {_non_finite_text(non_finite)}", "", numbers
        if len(seeds) < 2:
            return (
                "inconclusive",
                f"{pair}: needs ≥ 2 seeds measured on both, have {len(seeds)}",
                "",
                numbers,
            )
        arm_list = [arm_values[s] for s in seeds]
        base_list = [base_values[s] for s in seeds]
        if self.relative and any(b == 0.0 for b in base_list):
            return "inconclusive", f"{pair}: relative improvement undefined, baseline is 0 at some seed", "", numbers
        sign = 1.0 if self.better == "higher" else -1.0
        improvements = [
            sign * (a - b) / (abs(b) if self.relative else 1.0) for a, b in zip(arm_list, base_list, strict=True)
        ]
        if not all(math.isfinite(d) for d in improvements):
            return "inconclusive", f"{pair}: the per-seed differences overflow (values too large to compare)", "", \
                numbers
        interval = mean_interval(improvements, self.confidence)
        if interval.low > self.margin:
            verdict, relation = "holds", "CI > margin"
        elif interval.high < self.margin:
            verdict, relation = "fails", "CI < margin"
        else:
            verdict, relation = "inconclusive", "CI straddles or touches margin"
        kind = "relative improvement" if self.relative else "improvement"
        headline = (
            f"{pair} ({self.better} is better): {kind} {_ci_text(interval, self.relative, signed=True)}, "
            f"{relation} {self._margin_text()}"
        )
        detail = f"{self.arm} {_mean_std_text(arm_list)}, {self.baseline} {_mean_std_text(base_list)} (mean ± std)"
        numbers.update(_interval_numbers(interval))
        numbers.update(
            margin=self.margin,
            relative=self.relative,
            arm_mean=mean_interval(arm_list).mean,
            baseline_mean=mean_interval(base_list).mean,
        )
        return verdict, headline, detail, numbers

    def evaluate(self, results: dict[str, Any]) -> ClaimResult:
        """The verdict; evidence = improvement vs margin, then both arms' mean ± std over the paired seeds."""
        verdict, headline, detail, numbers = self.assess(results)
        evidence = f"{headline}; {detail}" if detail else headline
        return self._result(verdict, evidence, numbers)


@dataclass
class Monotone(Claim):
    """``metric`` improves along the ordered ``arms``: every ``arms[i+1]`` beats ``arms[i]`` (a ``Compare``).

    Holds when every consecutive comparison holds, fails when any fails, inconclusive otherwise.
    """

    kind: ClassVar[str] = "monotone"

    metric: str
    arms: list[str]
    better: str = "lower"
    margin: float = 0.0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        self._check_common()
        check_name(self._owner, "metric", self.metric)
        self.arms = check_name_list(self._owner, "arms", self.arms, minimum=2)
        check_choice(self._owner, "better", self.better, _DIRECTIONS)
        check_number(self._owner, "margin", self.margin)
        check_confidence(self._owner, self.confidence)

    def pairs(self) -> list[Compare]:
        """The consecutive comparisons: ``arms[i+1]`` over ``arms[i]``."""
        return [
            Compare(
                name=f"{self.name}[{index}]",
                statement="",
                metric=self.metric,
                arm=later,
                baseline=earlier,
                better=self.better,
                margin=self.margin,
                confidence=self.confidence,
            )
            for index, (earlier, later) in enumerate(itertools.pairwise(self.arms))
        ]

    def evaluate(self, results: dict[str, Any]) -> ClaimResult:
        """The verdict; evidence lists each consecutive pair's improvement and verdict."""
        _check_results(results)
        assessments = [pair.assess(results) for pair in self.pairs()]
        verdicts = [verdict for verdict, _, _, _ in assessments]
        if "fails" in verdicts:
            verdict = "fails"
        elif all(v == "holds" for v in verdicts):
            verdict = "holds"
        else:
            verdict = "inconclusive"
        evidence = "; ".join(f"{headline} → {v}" for v, headline, _, _ in assessments)
        numbers = {"metric": self.metric, "pairs": [dict(n, verdict=v) for v, _, _, n in assessments]}
        return self._result(verdict, evidence, numbers)


@dataclass
class Threshold(Claim):
    """The per-seed values of one arm (or derived quantity) are on the good side of a constant ``threshold``.

    ``better="higher"``: holds when the whole t-interval of the mean is above threshold, fails when it is entirely
    below. ``better="lower"``: holds when it is entirely below, fails when it is entirely above. Touching the
    threshold is inconclusive (module docstring).
    """

    kind: ClassVar[str] = "threshold"

    metric: str
    arm: str
    better: str = "higher"
    threshold: float = 0.0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        self._check_common()
        check_name(self._owner, "metric", self.metric)
        check_name(self._owner, "arm", self.arm)
        check_choice(self._owner, "better", self.better, _DIRECTIONS)
        check_number(self._owner, "threshold", self.threshold)
        check_confidence(self._owner, self.confidence)

    def evaluate(self, results: dict[str, Any]) -> ClaimResult:
        """The verdict; evidence = the arm's mean ± CI half-width against the threshold."""
        _check_results(results)
        values, missing = complete_metric_values(results, self.arm, self.metric)
        numbers: dict[str, Any] = {"metric": self.metric, "arm": self.arm, "threshold": self.threshold}
        if missing:
            return self._result("inconclusive", f"not measured: {missing}", numbers)
        seeds = sorted(values, key=seed_sort_key)
        numbers["seeds"] = seeds
        subject = f"{self.arm} {self.metric}"
        non_finite = _non_finite(self.arm, values, seeds)
        if non_finite:
            evidence = f"{subject}: {_non_finite_text(non_finite)}"
            return self._result("inconclusive", evidence, numbers)
        if len(seeds) < 2:
            return self._result("inconclusive", f"{subject}: needs ≥ 2 seeds, have {len(seeds)}", numbers)
        interval = mean_interval([values[s] for s in seeds], self.confidence)
        good, bad = (">", "<") if self.better == "higher" else ("<", ">")
        on_good_side = interval.low > self.threshold if self.better == "higher" else interval.high < self.threshold
        on_bad_side = interval.high < self.threshold if self.better == "higher" else interval.low > self.threshold
        if on_good_side:
            verdict, relation = "holds", f"CI {good} threshold"
        elif on_bad_side:
            verdict, relation = "fails", f"CI {bad} threshold"
        else:
            verdict, relation = "inconclusive", "CI straddles or touches threshold"
        evidence = (
            f"{subject} ({self.better} is better): {_ci_text(interval)}, {relation} {format_number(self.threshold)}"
        )
        numbers.update(_interval_numbers(interval))
        return self._result(verdict, evidence, numbers)


_CLAIM_KINDS: dict[str, type[Spec]] = {cls.kind: cls for cls in (Compare, Monotone, Threshold)}


def claim_from_dict(data: dict[str, Any]) -> Claim:
    """Rebuild a claim from ``claim.to_dict()``, dispatching on its ``kind`` (compare, monotone, threshold)."""
    claim = spec_from_dict(data, _CLAIM_KINDS, "claim")
    assert isinstance(claim, Claim)
    return claim


def check_claim_list(claims: list[Claim]) -> None:
    """Raise ValueError unless the claims' names are unique and every ``requires`` names a claim declared before it
    (what ``evaluate_claims`` relies on). The runner calls this before training, so that a recipe's mistake is not
    found only when the report renders."""
    seen: set[str] = set()
    for claim in claims:
        if claim.name in seen:
            raise ValueError(f"Two claims are named {claim.name!r}; a claim's name identifies it (a premise's "
                             "'requires' refers to it), so give each claim its own name.")
        if claim.requires is not None and claim.requires not in seen:
            raise ValueError(f"Claim {claim.name!r} requires claim {claim.requires!r}, which is not declared "
                             "before it; declare the premise first.")
        seen.add(claim.name)


def evaluate_claims(results: dict[str, Any]) -> list[ClaimResult]:
    """Evaluate every claim declared in ``results["claims"]`` (a list of ``to_dict()`` outputs), in order; a claim
    whose ``requires`` premise did not hold is reported inconclusive (ValueError from ``check_claim_list`` if the
    premise is not declared before it, or two claims share a name)."""
    _check_results(results)
    declared = results.get("claims", [])
    if not isinstance(declared, list):
        raise TypeError(f"results['claims'] must be a list of claim dicts, got {type(declared).__name__}.")
    claims = [claim_from_dict(entry) for entry in declared]
    check_claim_list(claims)
    verdicts: dict[str, str] = {}
    evaluated = []
    for claim in claims:
        result = claim.evaluate(results)
        if claim.requires is not None:
            premise = verdicts[claim.requires]
            if premise != "holds":
                result = replace(result, verdict="inconclusive",
                                 evidence=f"not decided: needs {claim.requires!r} to hold "
                                          f"({_PREMISE_OUTCOME[premise]}); measured: {result.evidence}")
        verdicts[claim.name] = result.verdict
        evaluated.append(result)
    return evaluated
