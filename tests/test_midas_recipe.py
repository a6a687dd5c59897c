"""The `midas` recipe end to end (smoke preset through the CLI), its compute accounting and its report pieces."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from effml.cli import main
from effml.config import ConfigError
from effml.experiments.midas import (MidasConfig, MidasRecipe, compute_to_reach, depth_schedule, modeled_seconds,
                                     primitive_tasks)
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
    assert list(results["arms"]) == ["baseline", "stacking", "midas", "midas-reduced", "step-times"]
    primitives = {f"finetuned_{p}" for p in ("induction", "assign-d0", "assign-d1", "assign-d2", "arithmetic")}
    for name, arm in results["arms"].items():
        assert len(arm["runs"]) == config.seeds and all(r["status"] == "complete" for r in arm["runs"].values())
        for run in arm["runs"].values():
            if name == "step-times":
                depths = [config.block_size * i for i in range(1, config.n_stages + 1)]
                assert set(run["metrics"]) == {f"step_seconds_{d}" for d in depths}
                assert all(value > 0 for value in run["metrics"].values())
                continue
            assert run["metrics"]["final_layers"] == config.n_layers  # every arm ends at the target depth
            assert len(run["curves"]["layer_similarity"]) == config.n_layers
            assert (primitives <= set(run["metrics"])) == (name in ("baseline", "midas"))
            steps = [step for step, _ in run["curves"]["valid_loss"]]
            assert [step for step, _ in run["curves"]["modeled_seconds"]] == steps  # added by derive
    claims = results["claims"]
    assert len(claims) == 2 + 1 + 5 + 1  # smoke has 2 stages: no interior-block claim
    report = (smoke_run / "report.md").read_text()
    assert all(claim["name"] in report for claim in claims)
    assert report.count("holds") + report.count("fails") + report.count("inconclusive") >= len(claims)
    for name in ("loss_vs_flops", "loss_vs_seconds", "layer_similarity", "loop_similarity"):
        assert (smoke_run / f"{name}.png").stat().st_size > 1000
    assert set(results["derived"]) == {"stacking", "midas", "midas-reduced", "midas-best"}
    for seed, best in results["derived"]["midas-best"]["runs"].items():
        pair = [results["derived"][name]["runs"][seed]["metrics"] for name in ("midas", "midas-reduced")]
        for metric in ("flops_saving", "time_saving", "measured_time_saving"):
            assert math.isfinite(best["metrics"][metric])
            assert best["metrics"][metric] == max(m[metric] for m in pair)
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
            assert run["metrics"]["flops"] == pytest.approx(expected, rel=1e-12)
            flops = [value for _, value in run["curves"]["flops"]]
            assert flops == sorted(flops) and flops[-1] == pytest.approx(expected, rel=1e-12)


def test_compute_to_reach_interpolates_the_first_crossing() -> None:
    losses = [[0, 5.0], [10, 3.0], [20, 2.0], [30, 1.0], [40, 1.5]]
    compute = [[0, 0.0], [10, 100.0], [20, 200.0], [30, 300.0], [40, 400.0]]
    assert compute_to_reach(losses, compute, 2.5) == pytest.approx(150.0)
    assert compute_to_reach(losses, compute, 1.0) == pytest.approx(300.0)
    assert compute_to_reach(losses, compute, 6.0) == 0.0
    assert math.isnan(compute_to_reach(losses, compute, 0.5))


def test_modeled_seconds_sum_the_step_time_of_each_steps_depth() -> None:
    config = MidasConfig(block_size=2, n_stages=3, alpha=1.0, reduced_budget=0.5,
                         train=dataclasses.replace(MidasConfig().train, steps=12, warmup_steps=2))
    assert depth_schedule(config, None, 12) == [6] * 12
    assert depth_schedule(config, "midas", 12) == [2] * 2 + [4] * 4 + [6] * 6  # Prop-1 stages 2, 4, 6
    seconds = {2: 1.0, 4: 10.0, 6: 100.0}
    curve = modeled_seconds(depth_schedule(config, "stacking", 12), seconds, [0, 2, 3, 12])
    assert curve == [[0.0, 0.0], [2.0, 2.0], [3.0, 12.0], [12.0, 2.0 + 40.0 + 600.0]]
    with pytest.raises(ValueError, match="no step time for depths \\[6\\]"):
        modeled_seconds([6], {2: 1.0}, [1])


def test_saving_targets_the_lower_loss_both_reach() -> None:
    """An arm that ends above the baseline's final loss is scored at its own final loss (finite, negative here)."""
    recipe, config = MidasRecipe(), MidasRecipe().preset("smoke")
    evals = list(range(3, config.train.steps + 1, 3))

    def run(losses: list[float]) -> dict:
        curve = [[float(s), loss] for s, loss in zip(evals, losses)]
        flops = [[float(s), float(s)] for s in evals[:len(losses)]]
        return {"status": "complete", "metrics": {"valid_loss": losses[-1]},
                "curves": {"valid_loss": curve, "flops": flops, "train_seconds": flops}}

    base = run([4.0, 3.0, 2.5, 2.0])
    worse = run([4.0, 3.5, 3.0, 2.8])  # ends at 2.8: the baseline got there at step 7.2 (3 → 2.5)
    reduced = run([4.0, 3.5])  # 6 steps of its 8
    times = {"status": "complete", "metrics": {f"step_seconds_{d}": 1.0 for d in (1, 2)}}
    results = {"arms": {"baseline": {"runs": {"0": base, "1": base}},
                        "midas": {"runs": {"0": worse, "1": base}},
                        "midas-reduced": {"runs": {"0": reduced, "1": reduced}},
                        "step-times": {"runs": {"0": times, "1": times}}}}
    derived = recipe.derive(config, results)
    worse_saving = derived["midas"]["runs"]["0"]["metrics"]
    assert worse_saving["reached"] == 0.0 and worse_saving["final_loss_gap"] == pytest.approx(0.8)
    assert worse_saving["flops_saving"] == pytest.approx(1.0 - 12.0 / (6.0 + 3.0 * 0.2 / 0.5))
    assert derived["midas"]["runs"]["1"]["metrics"]["flops_saving"] == pytest.approx(0.0)  # same curve
    assert derived["midas-best"]["runs"]["1"]["metrics"]["flops_saving"] == pytest.approx(0.0)
    assert derived["midas-best"]["runs"]["0"]["metrics"]["flops_saving"] == pytest.approx(1.0 - 6.0 / 4.5)
    assert base["curves"]["modeled_seconds"] == [[float(s), float(s)] for s in evals]  # 1 s per step


def test_primitives_follow_the_config() -> None:
    tasks = primitive_tasks(MidasConfig(shots=2, induction_length=10, induction_key_length=2, distractors=3))
    assert (tasks["induction"].length, tasks["induction"].key_length) == (10, 2)
    assert [tasks[f"assign-d{d}"].n_statements for d in (0, 1, 2)] == [4, 5, 6]  # chain of d + 1, plus 3 others
    assert [tasks[f"assign-d{d}"].depth for d in (0, 1, 2)] == [0, 1, 2]
    assert tasks["arithmetic"].n_vars == 5
    assert {task.shots for task in tasks.values()} == {2}
    # one distractor: every variable-assignment prompt offers two digits, so chance is 1/2 at every depth
    assert [t.chance_accuracy for n, t in primitive_tasks(MidasConfig(distractors=1)).items() if "assign" in n] \
        == [0.5] * 3


@pytest.mark.parametrize("changes, message", [
    ({"n_stages": 1}, "at least 2 stages"),
    ({"d_model": 100}, "multiple of head_dim"),
    ({"reduced_budget": 1.0}, "strictly between 0 and 1"),
    ({"optimizer_state": "keep"}, "optimizer_state"),
    ({"seq_len": 40}, "raise seq_len"),
    ({"induction_key_length": 8}, "primitives' settings are invalid"),  # no letter follows an 8-letter key
    ({"distractors": -1}, "distractors"),
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
