"""effml.report.claims: verdicts computed from per-seed measurements, and claims as data."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import pytest

from effml.report import (
    Claim,
    Compare,
    Monotone,
    Threshold,
    check_claim_list,
    claim_from_dict,
    evaluate_claims,
    t_critical,
)


def results_with(
    arms: dict[str, dict[str, float]],
    metric: str = "loss",
    statuses: dict[str, dict[str, str]] | None = None,
    derived: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """A results document with one final metric per seed; ``statuses[arm][seed]`` overrides "complete"."""
    statuses = statuses or {}

    def runs(entry: str, values: dict[str, float], with_status: bool) -> dict[str, Any]:
        out = {}
        for seed, value in values.items():
            run: dict[str, Any] = {"metrics": {metric: value}}
            if with_status:
                run["status"] = statuses.get(entry, {}).get(seed, "complete")
            out[seed] = run
        return out

    return {
        "arms": {name: {"label": name, "params": 1, "runs": runs(name, values, True)} for name, values in arms.items()},
        "derived": {name: {"label": name, "runs": runs(name, v, False)} for name, v in (derived or {}).items()},
    }


def seeded(values: list[float]) -> dict[str, float]:
    return {str(seed): value for seed, value in enumerate(values)}


def noisy(center: float, n: int, sd: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [center + rng.gauss(0.0, sd) for _ in range(n)]


# --- Compare --------------------------------------------------------------------------------------------------


def test_a_tie_on_the_margin_or_threshold_decides_nothing() -> None:
    """Every seed exactly on the boundary (a zero-width interval touching it, e.g. a slope of 0 between integer
    depths) is neither "> 0" nor "< 0": inconclusive, while the smallest clear step off it decides."""
    tie = results_with({"base": seeded([2.0, 3.0, 4.0]), "same": seeded([2.0, 3.0, 4.0]),
                        "slope": seeded([0.0, 0.0, 0.0]), "up": seeded([0.5, 0.5, 0.5])})
    assert Compare("c", "s", metric="loss", arm="same", baseline="base").evaluate(tie).verdict == "inconclusive"
    for better in ("higher", "lower"):
        result = Threshold("t", "s", metric="loss", arm="slope", better=better, threshold=0.0).evaluate(tie)
        assert result.verdict == "inconclusive" and "touches" in result.evidence
    assert Threshold("t", "s", metric="loss", arm="up", threshold=0.0).evaluate(tie).verdict == "holds"
    assert Threshold("t", "s", metric="loss", arm="up", better="lower", threshold=0.0).evaluate(tie).verdict == "fails"


def test_differences_too_large_for_a_float_are_inconclusive_not_an_error() -> None:
    huge = results_with({"base": seeded([-1e308, -1e308]), "arm": seeded([1e308, 1e308])})
    result = Compare("c", "s", metric="loss", arm="arm", baseline="base", better="higher").evaluate(huge)
    assert result.verdict == "inconclusive" and "overflow" in result.evidence


def test_compare_clearly_better_holds_and_clearly_worse_fails() -> None:
    results = results_with({"base": seeded(noisy(2.0, 3, 0.01, 0)), "good": seeded(noisy(1.8, 3, 0.01, 1)),
                            "bad": seeded(noisy(2.2, 3, 0.01, 2))})
    assert Compare("c", "good beats base", "loss", "good", "base").evaluate(results).verdict == "holds"
    assert Compare("c", "bad beats base", "loss", "bad", "base").evaluate(results).verdict == "fails"
    # Flipping the direction of "better" flips the verdict.
    assert Compare("c", "s", "loss", "good", "base", better="higher").evaluate(results).verdict == "fails"
    assert Compare("c", "s", "loss", "bad", "base", better="higher").evaluate(results).verdict == "holds"


def test_compare_noise_straddling_the_margin_is_inconclusive() -> None:
    # Per-seed improvements +0.1, -0.1, +0.05, -0.05: mean 0, interval around 0.
    results = results_with({"base": seeded([1.0, 1.0, 1.0, 1.0]), "arm": seeded([0.9, 1.1, 0.95, 1.05])})
    result = Compare("c", "s", "loss", "arm", "base").evaluate(results)
    assert result.verdict == "inconclusive"
    assert result.numbers["low"] < 0.0 < result.numbers["high"]


def test_compare_numbers_are_the_paired_t_interval() -> None:
    base = noisy(3.0, 5, 0.2, 4)
    arm = [b - d for b, d in zip(base, noisy(0.3, 5, 0.05, 5), strict=True)]
    result = Compare("c", "s", "loss", "arm", "base", confidence=0.9).evaluate(
        results_with({"base": seeded(base), "arm": seeded(arm)}))
    improvements = [b - a for a, b in zip(arm, base, strict=True)]
    half = t_critical(0.9, 4) * statistics.stdev(improvements) / math.sqrt(5)
    assert result.numbers["n"] == 5
    assert result.numbers["mean"] == pytest.approx(statistics.fmean(improvements), rel=1e-12)
    assert result.numbers["half_width"] == pytest.approx(half, rel=1e-9)
    assert "n=5" in result.evidence and "90% CI" in result.evidence


def test_compare_margin_decides_between_holds_and_fails() -> None:
    # Improvements 0.5 ± 0.01: a margin of 0.2 is cleared, a margin of 0.8 is not reached.
    base = [2.0, 2.1, 1.9]
    arm = [b - 0.5 + e for b, e in zip(base, [0.01, -0.01, 0.0], strict=True)]
    results = results_with({"base": seeded(base), "arm": seeded(arm)})
    assert Compare("c", "s", "loss", "arm", "base", margin=0.2).evaluate(results).verdict == "holds"
    assert Compare("c", "s", "loss", "arm", "base", margin=0.8).evaluate(results).verdict == "fails"
    assert Compare("c", "s", "loss", "arm", "base", margin=0.5).evaluate(results).verdict == "inconclusive"


def test_compare_absolute_verdict_is_shift_invariant_and_relative_is_scale_invariant() -> None:
    base = noisy(1.0, 4, 0.02, 6)
    arm = noisy(0.97, 4, 0.02, 7)
    reference_abs = Compare("c", "s", "loss", "arm", "base").evaluate(
        results_with({"base": seeded(base), "arm": seeded(arm)}))
    shifted = Compare("c", "s", "loss", "arm", "base").evaluate(
        results_with({"base": seeded([b + 10 for b in base]), "arm": seeded([a + 10 for a in arm])}))
    assert shifted.verdict == reference_abs.verdict
    assert shifted.numbers["mean"] == pytest.approx(reference_abs.numbers["mean"], abs=1e-12)
    reference_rel = Compare("c", "s", "loss", "arm", "base", relative=True).evaluate(
        results_with({"base": seeded(base), "arm": seeded(arm)}))
    scaled = Compare("c", "s", "loss", "arm", "base", relative=True).evaluate(
        results_with({"base": seeded([7 * b for b in base]), "arm": seeded([7 * a for a in arm])}))
    assert scaled.verdict == reference_rel.verdict
    assert scaled.numbers["mean"] == pytest.approx(reference_rel.numbers["mean"], rel=1e-12)


def test_relative_overhead_at_most_five_percent_both_ways() -> None:
    base = noisy(0.050, 3, 0.0002, 8)
    slightly_slower = [b * f for b, f in zip(base, [1.02, 1.021, 1.019], strict=True)]
    much_slower = [b * f for b, f in zip(base, [1.10, 1.11, 1.09], strict=True)]
    results = results_with({"base": seeded(base), "cheap": seeded(slightly_slower), "costly": seeded(much_slower)},
                           metric="step_time_s")

    def overhead(arm: str) -> Compare:
        return Compare("overhead", "at most 5% slower", "step_time_s", arm, "base", better="lower",
                       margin=-0.05, relative=True)

    assert overhead("cheap").evaluate(results).verdict == "holds"
    assert overhead("costly").evaluate(results).verdict == "fails"
    cheap = overhead("cheap").evaluate(results)
    assert cheap.numbers["mean"] == pytest.approx(-0.02, abs=1e-3)


def test_compare_pairs_only_the_seeds_both_arms_have() -> None:
    results = results_with({"base": seeded([1.0, 1.1, 1.2]), "arm": {"0": 0.5, "2": 0.7, "9": 0.0}})
    result = Compare("c", "s", "loss", "arm", "base").evaluate(results)
    assert result.numbers["seeds"] == ["0", "2"]
    assert result.numbers["n"] == 2
    assert result.numbers["mean"] == pytest.approx(0.5)


def test_compare_one_seed_is_inconclusive() -> None:
    results = results_with({"base": seeded([1.0]), "arm": seeded([0.1])})
    result = Compare("c", "s", "loss", "arm", "base").evaluate(results)
    assert result.verdict == "inconclusive"
    assert "needs ≥ 2 seeds" in result.evidence


def test_compare_missing_arm_metric_or_complete_runs_is_not_measured() -> None:
    results = results_with({"base": seeded([1.0, 1.1]), "arm": seeded([0.5, 0.6]), "running": seeded([0.1, 0.2])},
                           statuses={"running": {"0": "partial", "1": "failed"}})
    cases = {
        "ghost": Compare("c", "s", "loss", "ghost", "base"),
        "metric": Compare("c", "s", "accuracy", "arm", "base"),
        "running": Compare("c", "s", "loss", "running", "base"),
    }
    for what, claim in cases.items():
        result = claim.evaluate(results)
        assert result.verdict == "inconclusive", what
        assert result.evidence.startswith("not measured"), what
    assert "ghost" in cases["ghost"].evaluate(results).evidence
    assert "no complete runs" in cases["running"].evaluate(results).evidence


def test_only_complete_runs_count() -> None:
    # A partial run with a wildly different value would otherwise turn "holds" into "inconclusive".
    base = {"0": 1.0, "1": 1.01, "2": 0.99, "3": 5.0}
    arm = {"0": 0.8, "1": 0.81, "2": 0.79, "3": 0.0}
    results = results_with({"base": base, "arm": arm}, statuses={"arm": {"3": "partial"}})
    result = Compare("c", "s", "loss", "arm", "base").evaluate(results)
    assert result.verdict == "holds"
    assert result.numbers["n"] == 3


def test_non_finite_measurements_make_the_claim_inconclusive() -> None:
    results = results_with({"base": seeded([1.0, 1.1, 1.2]), "arm": seeded([0.5, float("nan"), 0.6])})
    result = Compare("c", "s", "loss", "arm", "base").evaluate(results)
    assert result.verdict == "inconclusive"
    assert "non-finite" in result.evidence and "seed 1" in result.evidence


# --- Monotone -------------------------------------------------------------------------------------------------


def test_monotone_needs_every_consecutive_pair() -> None:
    arms = {"s": seeded(noisy(3.0, 3, 0.01, 10)), "m": seeded(noisy(2.5, 3, 0.01, 11)),
            "l": seeded(noisy(2.0, 3, 0.01, 12)), "l_noisy": seeded([2.4, 2.6, 2.5]),
            "l_worse": seeded(noisy(2.9, 3, 0.01, 13))}
    results = results_with(arms)
    improving = Monotone("mono", "bigger is better", "loss", ["s", "m", "l"]).evaluate(results)
    assert improving.verdict == "holds"
    assert len(improving.numbers["pairs"]) == 2
    assert all(pair["verdict"] == "holds" for pair in improving.numbers["pairs"])
    assert "m vs s" in improving.evidence and "l vs m" in improving.evidence
    assert Monotone("mono", "s", "loss", ["s", "m", "l_worse"]).evaluate(results).verdict == "fails"
    assert Monotone("mono", "s", "loss", ["s", "m", "l_noisy"]).evaluate(results).verdict == "inconclusive"
    assert Monotone("mono", "s", "loss", ["s", "m", "missing"]).evaluate(results).verdict == "inconclusive"
    # Order matters: the reversed chain gets worse at every step.
    assert Monotone("mono", "s", "loss", ["l", "m", "s"]).evaluate(results).verdict == "fails"


# --- Threshold ------------------------------------------------------------------------------------------------


def test_threshold_higher_and_lower() -> None:
    results = results_with({"acc": seeded(noisy(0.93, 3, 0.005, 20))}, metric="accuracy")
    assert Threshold("t", "s", "accuracy", "acc", better="higher", threshold=0.9).evaluate(results).verdict == "holds"
    assert Threshold("t", "s", "accuracy", "acc", better="higher", threshold=0.95).evaluate(results).verdict == "fails"
    assert Threshold("t", "s", "accuracy", "acc", better="lower", threshold=0.95).evaluate(results).verdict == "holds"
    assert Threshold("t", "s", "accuracy", "acc", better="lower", threshold=0.9).evaluate(results).verdict == "fails"
    assert Threshold("t", "s", "accuracy", "acc", threshold=0.93).evaluate(results).verdict == "inconclusive"


def test_threshold_addresses_derived_quantities() -> None:
    results = results_with({}, metric="alpha", derived={"fit": seeded([0.30, 0.32, 0.31])})
    result = Threshold("alpha-positive", "the exponent is positive", "alpha", "fit", threshold=0.0).evaluate(results)
    assert result.verdict == "holds"
    assert result.numbers["mean"] == pytest.approx(0.31)
    assert Threshold("t", "s", "alpha", "fit").evaluate(results_with({}, metric="alpha")).verdict == "inconclusive"


def test_threshold_one_seed_is_inconclusive() -> None:
    result = Threshold("t", "s", "loss", "a", threshold=0.0).evaluate(results_with({"a": seeded([5.0])}))
    assert result.verdict == "inconclusive" and "needs ≥ 2 seeds" in result.evidence


# --- claims as data -------------------------------------------------------------------------------------------

CLAIMS: list[Claim] = [
    Compare("c", "arm beats base", "loss", "arm", "base", better="higher", margin=0.1, relative=True, confidence=0.9),
    Monotone("m", "bigger is better", "loss", ["a", "b", "c"], margin=0.01),
    Threshold("t", "exponent positive", "alpha", "fit", better="lower", threshold=1.5, confidence=0.99),
]


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.kind)
def test_claims_round_trip_through_dicts(claim: Claim) -> None:
    data = claim.to_dict()
    assert data["kind"] == claim.kind
    rebuilt = claim_from_dict(data)
    assert type(rebuilt) is type(claim) and rebuilt == claim
    assert rebuilt.to_dict() == data


def test_claim_from_dict_rejects_unknown_kinds_and_keys() -> None:
    with pytest.raises(ValueError, match="known kinds"):
        claim_from_dict({"kind": "vibes", "name": "x"})
    with pytest.raises(ValueError, match="unknown key"):
        claim_from_dict({**CLAIMS[0].to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="missing required"):
        claim_from_dict({"kind": "compare", "name": "x", "statement": "s"})
    with pytest.raises(TypeError):
        claim_from_dict(["compare"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Compare("c", "s", "loss", "a", "b", better="smaller"),
        lambda: Compare("c", "s", "loss", "a", "a"),
        lambda: Compare("c", "s", "loss", "a", "b", confidence=95),
        lambda: Compare("", "s", "loss", "a", "b"),
        lambda: Monotone("m", "s", "loss", ["a"]),
        lambda: Threshold("t", "s", "loss", "a", threshold=float("nan")),
    ],
)
def test_invalid_claims_raise_on_construction(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_evaluate_claims_reads_the_declared_claims_in_order() -> None:
    results = results_with({"base": seeded([1.0, 1.1, 1.2]), "arm": seeded([0.5, 0.6, 0.7])})
    results["claims"] = [Compare("better", "s", "loss", "arm", "base").to_dict(),
                         Compare("worse", "s", "loss", "base", "arm").to_dict()]
    verdicts = [(r.name, r.verdict) for r in evaluate_claims(results)]
    assert verdicts == [("better", "holds"), ("worse", "fails")]


def test_a_claim_whose_premise_does_not_hold_is_inconclusive_whatever_it_measured() -> None:
    premise = Threshold(name="base learns", statement="", metric="loss", arm="base", better="lower", threshold=1.0)
    dependent = Compare(name="method ≥ base", statement="", metric="loss", arm="method", baseline="base",
                        better="lower", requires="base learns")
    method_better = seeded([0.5, 0.6, 0.55])
    for base, premise_verdict, dependent_verdict, why in (
            ([0.9, 0.91, 0.92], "holds", "holds", ""),
            ([3.0, 3.1, 3.2], "fails", "inconclusive", "needs 'base learns' to hold (it fails)"),
            ([0.5, 1.5, 1.0], "inconclusive", "inconclusive", "needs 'base learns' to hold (it is inconclusive)")):
        results = results_with({"base": seeded(base), "method": method_better})
        results["claims"] = [premise.to_dict(), dependent.to_dict()]
        first, second = evaluate_claims(results)
        assert (first.verdict, second.verdict) == (premise_verdict, dependent_verdict)
        assert why in second.evidence
    assert claim_from_dict(dependent.to_dict()) == dependent
    results["claims"] = [dependent.to_dict(), premise.to_dict()]
    with pytest.raises(ValueError, match="not declared before it"):
        evaluate_claims(results)
    with pytest.raises(ValueError, match="requires"):
        Compare(name="x", statement="", metric="loss", arm="a", baseline="b", requires="")


def test_claim_lists_need_unique_names_and_premises_declared_first() -> None:
    first = Threshold("a", "s", metric="loss", arm="x")
    check_claim_list([first, Threshold("b", "s", metric="loss", arm="x", requires="a")])
    with pytest.raises(ValueError, match="Two claims are named 'a'"):
        check_claim_list([first, Threshold("a", "s", metric="loss", arm="y")])
    with pytest.raises(ValueError, match="requires claim 'a', which is not declared before it"):
        check_claim_list([Threshold("b", "s", metric="loss", arm="x", requires="a"), first])
