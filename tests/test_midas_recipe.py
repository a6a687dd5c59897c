"""The `midas` recipe end to end (smoke preset through the CLI), its compute accounting and its report pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from effml.cli import main
from effml.config import ConfigError
from effml.experiments.midas import MidasConfig, MidasRecipe, compute_to_reach
from effml.nn import TransformerConfig, TransformerLM
from effml.report import VERDICTS, CurvePlot, HeatmapPlot, plot_from_dict
from effml.train.growth import prop_alpha_stages


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "midas", "--preset", "smoke", "--quiet", "--out", str(out)]) == 0
    (run_dir,) = (out / "midas").iterdir()
    return run_dir


def test_smoke_run_reports_every_claim_with_a_computed_verdict(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    config = MidasRecipe().preset("smoke")
    assert results["status"] == "complete"
    assert list(results["arms"]) == ["baseline", "stacking", "midas", "midas-reduced"]
    for arm in results["arms"].values():
        assert len(arm["runs"]) == config.seeds and all(r["status"] == "complete" for r in arm["runs"].values())
        for run in arm["runs"].values():
            assert run["metrics"]["n_layers"] == config.n_layers  # every arm ends at the target depth
            assert len(run["curves"]["layer_similarity"]) == config.n_layers
            assert {f"finetuned_{p}" for p in ("induction", "assign-d0", "assign-d1", "assign-d2", "arithmetic")} \
                <= set(run["metrics"])
    claims = results["claims"]
    assert len(claims) == 2 + 5 + 1
    report = (smoke_run / "report.md").read_text()
    assert all(claim["name"] in report for claim in claims)
    assert report.count("holds") + report.count("fails") + report.count("inconclusive") >= len(claims)
    for name in ("loss_vs_flops", "loss_vs_seconds", "layer_similarity", "loop_similarity"):
        assert (smoke_run / f"{name}.png").stat().st_size > 1000
    assert set(results["derived"]) == {"stacking", "midas", "midas-reduced", "midas-best"}
    from effml.report import evaluate_claims
    assert {result.verdict for result in evaluate_claims(results)} <= set(VERDICTS)


def test_compute_accounting_follows_the_growth_schedule(smoke_run: Path) -> None:
    """total FLOPs = Σ_stages steps_i · flops_per_token(depth_i) · tokens per step, and the curve only grows."""
    results = json.loads((smoke_run / "results.json").read_text())
    config = MidasRecipe().preset("smoke")
    tokens = config.batch_size * config.seq_len

    def per_token(depth: int) -> float:
        return TransformerLM(TransformerConfig(vocab_size=256, d_model=config.d_model, n_layers=depth,
                                               n_heads=config.d_model // config.head_dim,
                                               max_seq_len=config.seq_len)).flops_per_token(config.seq_len)

    for arm, steps in (("baseline", config.train.steps), ("midas", config.train.steps),
                       ("midas-reduced", config.reduced_steps)):
        if arm == "baseline":
            expected = steps * per_token(config.n_layers) * tokens
        else:
            stages = prop_alpha_stages(steps, config.n_stages, config.alpha)
            expected = sum(length * per_token((i + 1) * config.block_size) * tokens for i, length in enumerate(stages))
        for run in results["arms"][arm]["runs"].values():
            assert run["metrics"]["total_flops"] == pytest.approx(expected, rel=1e-12)
            flops = [value for _, value in run["curves"]["flops"]]
            assert flops == sorted(flops) and flops[-1] == pytest.approx(expected, rel=1e-12)


def test_compute_to_reach_interpolates_the_first_crossing() -> None:
    losses = [[0, 5.0], [10, 3.0], [20, 2.0], [30, 1.0], [40, 1.5]]
    compute = [[0, 0.0], [10, 100.0], [20, 200.0], [30, 300.0], [40, 400.0]]
    assert compute_to_reach(losses, compute, 2.5) == pytest.approx(150.0)
    assert compute_to_reach(losses, compute, 1.0) == pytest.approx(300.0)
    assert compute_to_reach(losses, compute, 6.0) == 0.0
    assert math.isnan(compute_to_reach(losses, compute, 0.5))


@pytest.mark.parametrize("changes, message", [
    ({"n_stages": 1}, "at least 2 stages"),
    ({"d_model": 100}, "multiple of head_dim"),
    ({"reduced_budget": 1.0}, "strictly between 0 and 1"),
    ({"optimizer_state": "keep"}, "optimizer_state"),
    ({"seq_len": 40}, "raise seq_len"),
])
def test_bad_settings_are_rejected_with_the_fix(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MidasConfig(**changes)


def test_heatmap_and_compute_axis_plots_round_trip_and_render() -> None:
    results = {"arms": {"a": {"label": "A", "runs": {
        "0": {"status": "complete", "metrics": {}, "curves": {"sim": [[1.0, 0.2], [0.2, 1.0]],
                                                               "loss": [[0, 3.0], [5, 2.0]],
                                                               "flops": [[0, 0.0], [5, 10.0]]}},
        "1": {"status": "complete", "metrics": {}, "curves": {"sim": [[1.0, 0.4], [0.4, 1.0]]}}}},
        "b": {"label": "B", "runs": {}}}}
    heatmap = HeatmapPlot(name="sim", matrix="sim", title="similarity")
    assert plot_from_dict(heatmap.to_dict()) == heatmap
    assert [v for row in heatmap.mean_matrix(results, "a") for v in row] == pytest.approx([1.0, 0.3, 0.3, 1.0])
    assert heatmap.caption(results) == "Mean off-diagonal sim: a 0.3. Not measured: b."
    assert heatmap.render_png(results).startswith(b"\x89PNG")
    curve = CurvePlot(name="lf", curve="loss", x_curve="flops", xlabel="FLOPs", title="t", ylabel="loss")
    assert plot_from_dict(curve.to_dict()) == curve
    assert curve._arm_curves(results, "a")[0] == [[(0.0, 0.0, 3.0), (5.0, 10.0, 2.0)]]
    assert curve.render_png(results).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="vmin"):
        HeatmapPlot(name="x", matrix="m", title="t", vmin=1.0, vmax=0.0)
