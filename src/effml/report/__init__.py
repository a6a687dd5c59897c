"""effml.report — results documents → claim verdicts, tables, plots and report.md.

A recipe states its paper's claims and plots as data (``Compare``, ``Monotone``, ``Threshold``; ``CurvePlot``,
``MetricPlot``) and serialises them into results.json next to the measurements. The verdict on each claim —
``holds``, ``fails`` or ``inconclusive`` — is computed from the per-seed measurements (Student-t interval on the
mean), never written by hand, so ``effml report RUN_DIR`` re-renders any finished or interrupted run from its
results.json alone.

The results document (produced by the runner)::

    {"recipe", "description", "preset", "status": "complete"|"partial", "created", "environment": {...},
     "config": {...},
     "arms": {NAME: {"label", "params", "info": {...}, "seeds": [SEED, ...] (optional: the arm's own seeds),
                     "runs": {SEED: {"status": "complete"|"partial"|"failed",
                                     "metrics": {METRIC: float}, "curves": {CURVE: [[step, value], ...]}}}}},
     "derived": {NAME: {"label", "runs": {SEED: {"metrics": {...}}}}},
     "claims": [claim.to_dict(), ...], "plots": [plot.to_dict(), ...]}
"""

from __future__ import annotations

from effml.report.claims import (
    VERDICTS,
    Claim,
    ClaimResult,
    Compare,
    Monotone,
    Threshold,
    check_claim_list,
    claim_from_dict,
    evaluate_claims,
)
from effml.report.plots import CurvePlot, HeatmapPlot, MetricPlot, Plot, plot_from_dict
from effml.report.render import load_results, partial_run_warning, render_report, write_report
from effml.report.stats import Interval, best_by_mean, fit_power_law, mean_interval, t_critical

__all__ = [
    "VERDICTS",
    "Claim",
    "ClaimResult",
    "Compare",
    "Monotone",
    "Threshold",
    "check_claim_list",
    "claim_from_dict",
    "evaluate_claims",
    "Plot",
    "CurvePlot",
    "MetricPlot",
    "HeatmapPlot",
    "plot_from_dict",
    "render_report",
    "write_report",
    "load_results",
    "partial_run_warning",
    "Interval",
    "t_critical",
    "mean_interval",
    "fit_power_law",
    "best_by_mean",
]
