"""The `midas` recipe end to end (smoke preset through the CLI), its compute accounting and its report pieces."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from effml.config import ConfigError
from effml.experiments.base import RunContext
from effml.experiments.midas import (MidasConfig, MidasRecipe, budget_steps, compute_to_reach, depth_schedule,
                                     finetune_batches, modeled_seconds, primitive_tasks, training_flops)
from effml.nn import TransformerConfig, TransformerLM
from effml.report import VERDICTS, CurvePlot, HeatmapPlot, plot_from_dict
from effml.train.distributed import World
from effml.train.growth import prop_alpha_stages


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("midas")


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
    for seed in results["arms"]["midas"]["runs"]:  # both copy the first block, then [A, B, B'] against [A, A', B]
        stacking, midas = (results["arms"][arm]["runs"][seed]["curves"] for arm in ("stacking", "midas"))
        assert stacking["train_loss"] != midas["train_loss"]
        assert stacking["layer_similarity"] != midas["layer_similarity"]
    claims = results["claims"]
    assert len(claims) == 3 + 1 + 5 + 1 + 1  # smoke has 4 stages: the interior-block claim too
    report = (smoke_run / "report.md").read_text()
    assert all(claim["name"] in report for claim in claims)
    assert report.count("holds") + report.count("fails") + report.count("inconclusive") >= len(claims)
    for name in ("loss_vs_flops", "loss_vs_seconds", "layer_similarity", "loop_similarity"):
        assert (smoke_run / f"{name}.png").stat().st_size > 1000
    assert set(results["derived"]) == {f"{arm} vs baseline" for arm in ("stacking", "midas", "midas-reduced")}
    arm_steps = {arm.name: arm.info["steps"] for arm in MidasRecipe().arms(config)}
    for name, entry in results["derived"].items():
        arm = name.removesuffix(" vs baseline")
        for seed, run in entry["runs"].items():
            mine, base = (results["arms"][a]["runs"][seed]["metrics"] for a in (arm, "baseline"))
            assert run["metrics"]["test_loss_gap"] == mine["test_loss"] - base["test_loss"]
            assert run["metrics"]["flops_fraction"] == mine["flops"] / base["flops"]
            # Modeled seconds over the seed's timed steps: Σ_stages T_i · seconds(depth_i) ÷ (T · seconds(k·b)).
            # Whether the fraction is below 1 is a matter of machine load, which a test must not depend on.
            seconds = results["arms"]["step-times"]["runs"][seed]["metrics"]
            stages = prop_alpha_stages(arm_steps[arm], config.n_stages, config.alpha)
            modeled = sum(length * seconds[f"step_seconds_{(i + 1) * config.block_size}"]
                          for i, length in enumerate(stages))
            baseline = config.train.steps * seconds[f"step_seconds_{config.n_layers}"]
            assert math.isfinite(run["metrics"]["time_fraction"]) and run["metrics"]["time_fraction"] > 0.0
            assert run["metrics"]["time_fraction"] == pytest.approx(modeled / baseline, rel=1e-12)
    reduced = results["derived"]["midas-reduced vs baseline"]["runs"]
    assert all(run["metrics"]["flops_fraction"] <= config.reduced_budget for run in reduced.values())
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


@pytest.mark.slow
def test_two_processes_grow_train_and_measure_as_one_does(smoke_run: Path, torchrun_smoke) -> None:
    """Under torchrun the growing models (DDP re-wrapped at each stage) train, fine-tune and score as in one process."""
    torchrun_smoke("midas", json.loads((smoke_run / "results.json").read_text()))


def test_compute_to_reach_interpolates_the_first_crossing() -> None:
    losses = [[0, 5.0], [10, 3.0], [20, 2.0], [30, 1.0], [40, 1.5]]
    compute = [[0, 0.0], [10, 100.0], [20, 200.0], [30, 300.0], [40, 400.0]]
    assert compute_to_reach(losses, compute, 2.5) == pytest.approx(150.0)
    assert compute_to_reach(losses, compute, 1.0) == pytest.approx(300.0)
    assert compute_to_reach(losses, compute, 6.0) == 0.0
    assert math.isnan(compute_to_reach(losses, compute, 0.5))


def test_reduced_arm_gets_the_most_steps_within_its_share_of_the_baseline_flops() -> None:
    config = MidasRecipe().preset("cpu")
    baseline = training_flops(config, None, [config.train.steps])[0]
    steps = config.reduced_steps
    within, beyond = training_flops(config, "midas", [steps, steps + 1])
    assert within <= config.reduced_budget * baseline < beyond
    # the closed form for the cpu preset: flops_per_token(depth) = a + c · depth, depths 2/4/6/8 for Prop-1 stages
    one, two = (TransformerLM(TransformerConfig(vocab_size=256, d_model=config.d_model, n_layers=depth,
                                                n_heads=config.d_model // config.head_dim, max_seq_len=config.seq_len)
                              ).flops_per_token(config.seq_len) for depth in (1, 2))
    per_token = {depth: one + (depth - 1) * (two - one) for depth in (2, 4, 6, 8)}
    stages = prop_alpha_stages(steps, 4, 1.0)
    tokens = config.batch_size * config.seq_len
    assert within == pytest.approx(sum(n * per_token[2 * (i + 1)] for i, n in enumerate(stages)) * tokens, rel=1e-12)
    assert baseline == pytest.approx(config.train.steps * per_token[8] * tokens, rel=1e-12)
    assert budget_steps(config, "midas", 0.0) == config.n_stages  # nothing fits: the smallest run


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


def test_derive_pairs_each_growth_arm_with_the_same_seeds_baseline() -> None:
    """Test-loss gap and compute fractions per seed; the curve-crossing saving targets the lower loss both reach (an
    arm that ends above the baseline's final loss is scored at its own final loss: finite, negative here)."""
    recipe, config = MidasRecipe(), MidasRecipe().preset("smoke")  # 12 steps, depths 1-4, Prop-1 stages 1, 2, 4, 5
    evals = list(range(3, config.train.steps + 1, 3))

    def run(losses: list[float], test_loss: float, flops: float) -> dict:
        curve = [[float(s), loss] for s, loss in zip(evals, losses, strict=False)]  # a shorter run: fewer evals
        spent = [[float(s), float(s)] for s in evals[:len(losses)]]
        return {"status": "complete", "metrics": {"valid_loss": losses[-1], "test_loss": test_loss, "flops": flops},
                "curves": {"valid_loss": curve, "flops": spent, "train_seconds": spent}}

    base = run([4.0, 3.0, 2.5, 2.0], test_loss=2.1, flops=100.0)
    worse = run([4.0, 3.5, 3.0, 2.8], test_loss=2.9, flops=70.0)  # ends at 2.8: the baseline got there at step 7.2
    reduced = run([4.0, 3.5, 3.0], test_loss=3.0, flops=50.0)
    seconds = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    times = {"status": "complete", "metrics": {f"step_seconds_{depth}": value for depth, value in seconds.items()}}
    results = {"arms": {"baseline": {"runs": {"0": base, "1": base}},
                        "midas": {"runs": {"0": worse, "1": run([4.0, 3.0, 2.5, 2.0], 2.1, 100.0)}},
                        "midas-reduced": {"runs": {"0": reduced}},
                        "step-times": {"runs": {"0": times, "1": times}}}}
    derived = recipe.derive(config, results)
    worse_run = derived["midas vs baseline"]["runs"]["0"]["metrics"]
    assert worse_run["reached"] == 0.0 and worse_run["final_loss_gap"] == pytest.approx(0.8)
    assert worse_run["flops_saving"] == pytest.approx(1.0 - 12.0 / (6.0 + 3.0 * 0.2 / 0.5))
    assert worse_run["test_loss_gap"] == pytest.approx(0.8) and worse_run["flops_fraction"] == pytest.approx(0.7)
    assert worse_run["time_fraction"] == pytest.approx((1 * 1.0 + 2 * 2.0 + 4 * 3.0 + 5 * 4.0) / (12 * 4.0))
    assert derived["midas vs baseline"]["runs"]["1"]["metrics"]["flops_saving"] == pytest.approx(0.0)  # same curve
    assert derived["midas vs baseline"]["runs"]["1"]["metrics"]["test_loss_gap"] == 0.0
    assert set(derived["midas-reduced vs baseline"]["runs"]) == {"0"}  # seed 1 not measured
    steps = config.reduced_steps
    depths = depth_schedule(config, "midas", steps)
    assert derived["midas-reduced vs baseline"]["runs"]["0"]["metrics"]["time_fraction"] == pytest.approx(
        sum(seconds[d] for d in depths) / 48.0)
    assert base["curves"]["modeled_seconds"] == [[float(s), 4.0 * s] for s in evals]  # 4 s per step at depth 4

    # A partial run whose step-time arm (run last) is missing keeps every quantity that needs no timing
    del results["arms"]["step-times"]
    partial = recipe.derive(config, results)["midas vs baseline"]["runs"]["0"]["metrics"]
    assert partial["test_loss_gap"] == pytest.approx(0.8) and partial["flops_fraction"] == pytest.approx(0.7)
    assert "time_fraction" not in partial and "time_saving" not in partial


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


def test_finetune_batches_are_sharded_across_ranks_and_unchanged_in_one_process(tmp_path: Path) -> None:
    """Under torchrun each rank fine-tunes on its half of the global batch (not on a copy of the whole of it); one
    process keeps fine-tuning on exactly the sequences it drew before sharding existed: the primitives in turn."""
    config = MidasRecipe().preset("smoke")  # finetune_batch 8
    tasks = primitive_tasks(config)

    def batches(rank: int, world_size: int):
        context = RunContext(run_dir=tmp_path, seed=1, device="cpu", world=World(rank=rank, world_size=world_size))
        return finetune_batches(config, tasks, context)

    single, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
    half = config.finetune_batch // 2
    for index in range(len(tasks) + 1):  # every primitive, then the first again
        task = list(tasks.values())[index % len(tasks)]
        whole, before = single(index), task.sample_every_answer(config.finetune_batch, 1_000_000 + index)  # old
        for name in ("inputs", "targets", "loss_mask"):
            assert torch.equal(getattr(whole, name), getattr(before, name))
            assert torch.equal(getattr(first(index), name), getattr(whole, name)[:half])
            assert torch.equal(getattr(second(index), name), getattr(whole, name)[half:])


@pytest.mark.parametrize("changes, message", [
    ({"n_stages": 1}, "at least 2 stages"),
    ({"d_model": 100}, "multiple of head_dim"),
    ({"reduced_budget": 1.0}, "strictly between 0 and 1"),
    ({"reduced_budget": 0.8}, "more than 1 − speedup_threshold"),
    ({"optimizer_state": "keep"}, "optimizer_state"),
    ({"n_stages": 6}, "Lower reduced_budget below 0.726"),  # 6 stages already cost 0.726: 0.73 buys 301 > 300 steps
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
    heatmap_axes = heatmap.figure(results).axes[0]  # 2 layers: ticks at 0 and 1, none at 0.5
    assert all(tick == int(tick) for tick in [*heatmap_axes.get_xticks(), *heatmap_axes.get_yticks()])
    curve = CurvePlot(name="lf", curve="loss", x_curve="flops", xlabel="FLOPs", title="t", ylabel="loss")
    assert plot_from_dict(curve.to_dict()) == curve
    assert curve._arm_curves(results, "a")[0] == [[(0.0, 0.0, 3.0), (5.0, 10.0, 2.0)]]
    assert curve.render_png(results).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="vmin"):
        HeatmapPlot(name="x", matrix="m", title="t", vmin=1.0, vmax=0.0)
