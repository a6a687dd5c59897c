"""effml.report.render and plots: report.md from results.json alone, round trips, partial runs, PNG plots."""

from __future__ import annotations

import copy
import io
import json
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from effml.report import (
    Compare,
    CurvePlot,
    MetricPlot,
    Threshold,
    load_results,
    partial_run_warning,
    plot_from_dict,
    render_report,
    write_report,
)
from effml.report.stats import format_mean_spread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALPHA = 0.25
SCALE = 9.0


def make_results(seeds: int = 3) -> dict[str, Any]:
    """Three arms whose mean valid loss follows SCALE·params^(−ALPHA) exactly (symmetric noise around it)."""
    rng = random.Random(0)
    arms: dict[str, Any] = {}
    for name, params in (("small", 1_000), ("medium", 8_000), ("large", 64_000)):
        target = SCALE * params**-ALPHA
        offsets = [0.0] if seeds == 1 else [(i - (seeds - 1) / 2) * 0.01 for i in range(seeds)]
        runs = {}
        for seed, offset in enumerate(offsets):
            runs[str(seed)] = {
                "status": "complete",
                "metrics": {"valid_loss": target + offset, "step_time_s": 0.05 + rng.uniform(0, 0.001)},
                "curves": {"train_loss": [[step, target + 1.0 / (1 + step) + offset] for step in range(0, 50, 10)]},
            }
        arms[name] = {"label": f"{params} params", "params": params, "info": {"d_model": params // 100}, "runs": runs}
    return {
        "recipe": "toy-scaling",
        "description": "A synthetic scaling study.",
        "preset": "smoke",
        "status": "complete",
        "created": "2026-11-22T06:00:00+00:00",
        "environment": {"torch": "2.13.0", "python": "3.11.7", "device": "cpu", "threads": 2},
        "config": {"seeds": list(range(seeds)), "model": {"layers": 2}},
        "arms": arms,
        "derived": {"fit": {"label": "power-law exponent", "runs": {"0": {"metrics": {"alpha": 0.24}},
                                                                     "1": {"metrics": {"alpha": 0.26}}}}},
        "claims": [
            Compare("large-beats-small", "The large model reaches lower loss.", "valid_loss", "large",
                    "small").to_dict(),
            Threshold("alpha-positive", "Loss falls with size.", "alpha", "fit", threshold=0.0,
                      confidence=0.9).to_dict(),
        ],
        "plots": [
            CurvePlot("train_curve", "train_loss", "Training loss", "loss", logy=True).to_dict(),
            MetricPlot("scaling", "params", "valid_loss", "Loss vs size", logx=True, logy=True,
                       fit="power_law").to_dict(),
        ],
    }


def test_report_round_trips_through_results_json(tmp_path: Path) -> None:
    results = make_results()
    write_report(tmp_path / "run", results)
    written = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    reloaded = load_results(tmp_path / "run")
    assert reloaded == json.loads(json.dumps(results))
    assert render_report(reloaded, tmp_path / "again") == written
    for name in ("train_curve.png", "scaling.png"):
        for directory in ("run", "again"):
            data = (tmp_path / directory / name).read_bytes()
            assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_report_reads_top_down(tmp_path: Path) -> None:
    text = render_report(make_results(), tmp_path)
    title, claims, arms, derived, plots, environment, config = (
        text.index(marker) for marker in
        ("# toy-scaling", "## Claims", "## Arms", "## Derived", "## Plots", "## Environment", "<details>")
    )
    assert title < claims < arms < derived < plots < environment < config
    assert "preset `smoke`" in text and "status **complete**" in text and "2026-11-22" in text
    assert "| `large-beats-small` | The large model reaches lower loss. | **holds** |" in text
    assert "| `alpha-positive` | Loss falls with size. | **holds** |" in text
    assert "![Training loss](train_curve.png)" in text and "![Loss vs size](scaling.png)" in text
    assert "Missing measurements" not in text


def test_arms_table_shows_mean_and_std_of_complete_seeds(tmp_path: Path) -> None:
    results = make_results()
    text = render_report(results, tmp_path)
    small_row = next(line for line in text.splitlines() if line.startswith("| `small`"))
    values = [run["metrics"]["valid_loss"] for run in results["arms"]["small"]["runs"].values()]
    assert format_mean_spread(statistics.fmean(values), statistics.stdev(values)) in small_row
    assert "1,000" in small_row and "3/3" in small_row


def test_partial_run_renders_and_says_what_is_missing(tmp_path: Path) -> None:
    results = make_results()
    results["status"] = "partial"
    results["arms"]["large"]["runs"]["1"]["status"] = "partial"
    del results["arms"]["large"]["runs"]["2"]
    results["arms"]["huge"] = {"label": "not started", "params": 512_000, "info": {}, "runs": {}}
    results["claims"].append(Compare("huge-beats-large", "s", "valid_loss", "huge", "large").to_dict())
    results["plots"].append(MetricPlot("steps", "d_model", "step_time_s", "Step time").to_dict())
    text = render_report(results, tmp_path)
    missing = text[text.index("## Missing measurements"):text.index("## Claims")]
    assert "`large`: seed 1 partial, seed 2 not started" in missing
    assert "`huge`: no runs" in missing
    assert "`small`" not in missing
    # One complete seed left for "large": its claim cannot be decided; "huge" is named as not measured.
    assert "| `large-beats-small` | The large model reaches lower loss. | **inconclusive** |" in text
    assert "not measured: 'huge' has no complete runs" in text
    assert "1/3" in next(line for line in text.splitlines() if line.startswith("| `large`"))
    for name in ("train_curve.png", "scaling.png", "steps.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


def test_an_arm_with_its_own_seed_list_is_judged_against_it(tmp_path: Path) -> None:
    """Experiment.arm_seeds: an arm may run more seeds than the config's; the others are not "missing" them."""
    results = make_results()
    large = results["arms"]["large"]
    large["seeds"] = [0, 1, 2, 3, 4]
    for seed in ("3", "4"):
        large["runs"][seed] = copy.deepcopy(large["runs"]["0"])
    text = render_report(results, tmp_path)
    assert "Missing measurements" not in text
    assert "5/5" in next(line for line in text.splitlines() if line.startswith("| `large`"))
    assert "3/3" in next(line for line in text.splitlines() if line.startswith("| `small`"))
    del large["runs"]["4"]
    results["status"] = "partial"
    text = render_report(results, tmp_path)
    missing = text[text.index("## Missing measurements"):text.index("## Claims")]
    assert "`large`: seed 4 not started" in missing and "`small`" not in missing
    assert "4/5" in next(line for line in text.splitlines() if line.startswith("| `large`"))


def test_run_without_any_measurements_renders(tmp_path: Path) -> None:
    results = make_results()
    for arm in results["arms"].values():
        arm["runs"] = {}
        arm["params"] = None  # the runner knows the size only after the first run
    results["derived"] = {}
    results["status"] = "partial"
    results["config"] = {"seed": 10, "seeds": 2}  # Experiment.seeds convention: seeds 10 and 11
    text = render_report(results, tmp_path)
    assert text.count("**inconclusive**") == 2
    assert "| `small` | 1000 params | — | 10 | 0/2 |" in text
    assert (tmp_path / "scaling.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "Power-law fit needs" in text


def test_power_law_fit_recovers_the_exponent_from_arm_means() -> None:
    plot = MetricPlot("scaling", "params", "valid_loss", "Loss vs size", fit="power_law")
    a, alpha = plot.power_law(make_results(seeds=2))
    assert alpha == pytest.approx(ALPHA, rel=1e-9)
    assert a == pytest.approx(SCALE, rel=1e-9)
    assert f"^(−{ALPHA:g})" in plot.caption(make_results(seeds=2))


def test_metric_plot_x_from_info_or_a_metric() -> None:
    results = make_results()
    by_info = MetricPlot("by_width", "d_model", "valid_loss", "Loss vs width")
    points, missing = by_info.points(results)
    assert [(arm, x) for arm, x, _, _ in points] == [("small", 10.0), ("medium", 80.0), ("large", 640.0)]
    assert missing == []
    by_metric = MetricPlot("by_time", "step_time_s", "valid_loss", "Loss vs step time")
    points, _ = by_metric.points(results)
    for arm, x, _, _ in points:
        times = [run["metrics"]["step_time_s"] for run in results["arms"][arm]["runs"].values()]
        assert x == pytest.approx(statistics.fmean(times), rel=1e-12)
    missing_x = MetricPlot("by_nothing", "no_such_key", "valid_loss", "t")
    assert missing_x.points(results) == ([], ["small", "medium", "large"])


@pytest.mark.parametrize(
    "plot",
    [
        CurvePlot("c", "train_loss", "Title", "loss", arms=["small", "large"], logy=True),
        MetricPlot("m", "params", "valid_loss", "Title", logx=True, fit="power_law", arms=["small", "large"]),
    ],
    ids=lambda p: p.kind,
)
def test_plots_round_trip_through_dicts(plot: Any) -> None:
    data = json.loads(json.dumps(plot.to_dict()))
    rebuilt = plot_from_dict(data)
    assert type(rebuilt) is type(plot) and rebuilt == plot


def test_plot_specs_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="known kinds"):
        plot_from_dict({"kind": "pie", "name": "x"})
    with pytest.raises(ValueError, match="file name"):
        CurvePlot("../escape", "train_loss", "t", "y")
    with pytest.raises(ValueError, match="fit"):
        MetricPlot("m", "params", "loss", "t", fit="exponential")


def test_write_report_rejects_unserialisable_results(tmp_path: Path) -> None:
    results = make_results()
    results["config"]["callback"] = object()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        write_report(tmp_path, results)


def test_load_results_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "results.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"recipe": "x"}), encoding="utf-8")
    with pytest.raises(ValueError, match="'arms'"):
        load_results(tmp_path / "results.json")


def test_rendering_does_not_modify_the_results(tmp_path: Path) -> None:
    results = make_results()
    before = copy.deepcopy(results)
    render_report(results, tmp_path)
    assert results == before


def test_partial_results_carry_one_warning_line_that_report_md_shows_above_the_claims(tmp_path: Path) -> None:
    """`effml report` printed the verdicts of a partial run without saying so; the line is available to it now, in
    report.md's words."""
    results = make_results()
    assert partial_run_warning(results) == ""
    assert "WARNING" not in render_report(results, tmp_path)
    del results["arms"]["large"]["runs"]["2"]
    results["status"] = "partial"
    warning = partial_run_warning(results)
    assert warning == ("WARNING: partial results (run status 'partial'; 1 of 3 arms lack complete seeds): the verdicts "
                       "count only the complete runs and may change when the run is resumed or finished.")
    text = render_report(results, tmp_path)
    claims = text[text.index("## Claims"):text.index("## Arms")]
    assert claims.splitlines()[2] == f"> {warning}"
    results["arms"]["large"]["runs"]["1"]["status"] = "failed"  # a status 'complete' with a failed seed is flagged too
    results["status"] = "complete"
    assert "(run status 'complete'; 1 of 3 arms lack complete seeds)" in partial_run_warning(results)


@pytest.mark.parametrize("point, moved, twins", [
    ("small", ["medium", "large"], 0),  # all three arms at the small arm's point
    ("large", [], 7),  # 7 more arms at the lowest point: their labels pile up below it, and the layout makes room
])
def test_metric_plot_labels_of_points_in_one_place_do_not_overlap_in_the_saved_figure(point: str, moved: list[str],
                                                                                      twins: int) -> None:
    results = make_results()
    arms = results["arms"]
    for name in moved:
        arms[name].update(params=arms[point]["params"], runs=copy.deepcopy(arms[point]["runs"]))
    for index in range(twins):
        arms[f"twin{index}"] = {**copy.deepcopy(arms[point]), "label": f"twin {index}"}
    figure = MetricPlot("m", "params", "valid_loss", "t").figure(results)
    figure.savefig(io.BytesIO(), format="png")  # as render_png saves it: savefig must not lay the axes out anew
    boxes = [text.get_window_extent() for text in figure.axes[0].texts]
    assert len(boxes) == len(arms)
    assert not any(first.overlaps(second) for i, first in enumerate(boxes) for second in boxes[i + 1:])
    page = figure.bbox
    assert all(page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1 for box in boxes)
