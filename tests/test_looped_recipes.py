"""The looped-transformer recipes: `looped-depth` and `looped-gd` smoke presets end to end through the CLI, their
training batches under data parallelism, the depth-needed interpolation, and configuration errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from effml.cli import EXIT_USER_ERROR, main
from effml.experiments.looped_depth import _line_fit, _unreached_slope, depth_needed
from effml.report import VERDICTS


def smoke(recipe: str, out: Path) -> dict:
    assert main(["run", recipe, "--preset", "smoke", "--quiet", "--out", str(out)]) == 0
    (run_dir,) = (out / recipe).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    report = (run_dir / "report.md").read_text()
    for claim in results["claims"]:
        assert claim["name"] in report
    for plot in results["plots"]:
        assert (run_dir / f"{plot['name']}.png").is_file()
    return results


def test_looped_depth_smoke_end_to_end(tmp_path: Path) -> None:
    results = smoke("looped-depth", tmp_path)
    assert set(results["arms"]) == {f"{family}-L{depth}-k{kappa}" for kappa in (1, 10) for family, depth in
                                    (("multi", 1), ("multi", 2), ("looped", 2), ("softmax", 1), ("softmax", 2))}
    for name, arm in results["arms"].items():
        if name.startswith("softmax"):  # one shared block whatever the number of loops
            assert arm["params"] == results["arms"]["softmax-L1-k1"]["params"] > 2 * 2 * 4 ** 2
        else:
            assert arm["params"] == (2 if name.startswith("multi-L2") else 1) * 2 * 4 ** 2  # d=3: P, Q are 4×4
        for run in arm["runs"].values():
            metrics = run["metrics"]
            depth = arm["info"]["depth"]
            assert [k for k in metrics if k.startswith("nmse@")] == [f"nmse@{k}" for k in range(1, depth + 1)]
            assert metrics[f"nmse@{depth}"] == metrics["nmse"] and metrics["shift_w2@1"] > 0
            assert ("readout_rise" in metrics) == (depth > 1)
            assert [p[0] for p in run["curves"]["readout_nmse"]] == list(range(1, depth + 1))
    derived = results["derived"]
    for family in ("multi", "looped", "softmax"):
        for run in derived[f"depth-fit-{family}"]["runs"].values():
            assert {"depth_needed@k1", "depth_needed@k10", "slope_per_ln_kappa"} <= set(run["metrics"])
    ratio = derived["shift-robustness"]["runs"]["0"]["metrics"]["multi_over_looped"]
    arms = results["arms"]
    assert ratio == pytest.approx(arms["multi-L2-k10"]["runs"]["0"]["metrics"]["shift_nmse"]
                                  / arms["looped-L2-k10"]["runs"]["0"]["metrics"]["shift_nmse"])


def test_looped_gd_smoke_end_to_end(tmp_path: Path) -> None:
    results = smoke("looped-gd", tmp_path)
    assert set(results["arms"]) == {"n8", "n32", "full-n8", "full-n32"}
    for name, arm in results["arms"].items():
        assert arm["params"] == (2 * 4 * 4 if name.startswith("full") else 3 * 3 + 3)  # P, Q or A (d×d) and u (d)
        for run in arm["runs"].values():
            metrics = run["metrics"]
            assert metrics["gd_mismatch"] >= 0 and metrics["u_ratio"] > 0 and metrics["precond_error"] > 0
            if not name.startswith("full"):  # the restricted model differs from explicit GD only through u
                assert metrics["gd_mismatch"] < 0.05
            assert metrics["nmse_loops@2"] == metrics["nmse"]
            for prefix in ("", "rotated_", "rescaled_"):
                assert [p[0] for p in run["curves"][f"{prefix}nmse_vs_loops"]] == [1, 2, 4]
            assert metrics["rotated_w2"] > 0 and metrics["rescaled_w2"] > 0


@pytest.mark.parametrize(("recipe", "task_argument"), [("looped-gd", "n_contexts"), ("looped-depth", "kappas")])
def test_training_prompts_are_sharded_across_ranks_and_unchanged_in_one_process(recipe, task_argument,
                                                                                check_recipe_sharding) -> None:
    """Under torchrun each rank must train on its half of the global batch, not on a copy of the whole of it; one
    process must keep training on exactly the prompts it drew before sharding existed."""
    from effml.experiments import get_experiment

    experiment = get_experiment(recipe)
    config = experiment.preset("smoke")  # batch_size 16
    task = experiment.task(config, getattr(config, task_argument)[0])
    check_recipe_sharding(lambda task, context: experiment.training_batches(config, task, context), task,
                          config.batch_size, 3, ("xs", "ys", "query", "target", "covariance", "weights"))


def test_depth_needed_interpolates_in_log_depth() -> None:
    assert depth_needed([1, 2, 4], [0.05, 0.01, 0.001], 0.1) == (1.0, False)
    assert depth_needed([1, 2, 4], [0.4, 0.1, 0.01], 0.1) == (pytest.approx(2.0), False)
    # halfway in ln(error) between depth 2 (0.4) and depth 4 (0.025) is 0.1: depth 2^1.5
    assert depth_needed([1, 2, 4], [0.8, 0.4, 0.025], 0.1) == (pytest.approx(2 ** 1.5), False)
    # a deeper model that does worse does not count against the running best
    assert depth_needed([1, 2, 4, 8], [0.8, 0.4, 0.9, 0.025], 0.1)[0] == pytest.approx(2 ** 2.5)
    # never reached: extrapolate the last segment (0.4 → 0.2 per doubling reaches 0.1 one doubling later)
    assert depth_needed([1, 2, 4], [0.8, 0.4, 0.2], 0.1) == (pytest.approx(8.0), True)
    for errors in ([0.5, 0.6], [1.0526, 1.0518]):  # rising, or so flat that it would take > 2^10 × more depth
        depth, extrapolated = depth_needed([1, 2], errors, 0.1)
        assert math.isinf(depth) and extrapolated


def test_line_fit_slope_and_r2() -> None:
    slope, intercept, r2 = _line_fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert (slope, intercept, r2) == pytest.approx((2.0, 1.0, 1.0))
    # y = x² on -1, 0, 1: the best line is flat at 2/3 and explains nothing
    slope, intercept, r2 = _line_fit([-1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert (slope, intercept, r2) == pytest.approx((0.0, 2 / 3, 0.0))


@pytest.mark.parametrize(("arguments", "expected"), [
    (["looped-depth", "--set", "probe_kappa=3"], "probe_kappa = 3.0 is not one of kappas"),
    (["looped-depth", "--set", "depths=2,4"], "starting at 1"),
    (["looped-depth", "--set", "kappas=10"], "at least two distinct condition numbers"),
    (["looped-gd", "--set", "test_loops=1,4"], "contain the training loops=2"),
    (["looped-gd", "--set", "test_loops=0,2,4"], "test_loops = \\(0, 2, 4\\): every test loop count must be positive"),
    (["looped-gd", "--set", "test_loops=-1,2,4"], "test_loops = \\(-1, 2, 4\\): every test loop count must be pos"),
    (["looped-gd", "--set", "init_std=0"], "claim \\(1a\\) would test nothing"),
    (["looped-gd", "--set", "attentions=unrestricted"], "include 'restricted'"),
    # a repeated entry ran the same arms twice under one name, or the same shifted test twice
    (["looped-gd", "--set", "attentions=restricted,restricted"], "attentions = .* lists 'restricted' twice"),
    (["looped-depth", "--set", "families=multi,looped,looped"], "families = .* lists 'looped' twice"),
    (["looped-depth", "--set", "shift_scales=1.25,1.25"], "shift_scales = .* lists 1.25 twice"),
])
def test_bad_recipe_settings_exit_2_and_write_nothing(arguments, expected, tmp_path: Path, capsys) -> None:
    import re

    out = tmp_path / "runs"
    assert main(["run", *arguments[:1], "--preset", "smoke", *arguments[1:], "--out", str(out)]) == EXIT_USER_ERROR
    assert re.search(expected, capsys.readouterr().err)
    assert not out.exists() or not any(out.rglob("*"))


def test_every_claim_is_decided_from_data_not_written() -> None:
    from effml.experiments import get_experiment
    from effml.report import claim_from_dict

    for recipe in ("looped-depth", "looped-gd"):
        experiment = get_experiment(recipe)
        config = experiment.preset("cpu")
        for claim in experiment.claims(config):
            empty = {"arms": {}, "derived": {}}
            assert claim_from_dict(claim.to_dict()).evaluate(empty).verdict == "inconclusive"
            assert claim.evaluate(empty).verdict in VERDICTS


def test_huge_finite_errors_of_a_diverged_model_still_summarise() -> None:
    from effml.report import mean_interval

    summary = mean_interval([1e200, 3e200, 2e200])
    assert summary.mean == pytest.approx(2e200) and summary.std == pytest.approx(1e200)
    assert mean_interval([2.0, 2.0]).std == 0.0


def test_a_depth_never_reached_gives_the_direction_of_growth_never_the_wrong_sign() -> None:
    """κ ascending: unreached at the largest κ after rising depths grows (+inf); unreached at the smallest κ before
    falling depths falls (−inf: it was reported +inf); mixed or nowhere reached is undecided (NaN)."""
    inf = math.inf
    assert _unreached_slope([1.0, 2.0, inf]) == inf
    assert _unreached_slope([inf, 1.6, 1.0]) == -inf
    assert math.isnan(_unreached_slope([1.0, inf, 2.0]))
    assert math.isnan(_unreached_slope([2.0, 1.0, inf]))
    assert math.isnan(_unreached_slope([inf, inf, inf]))
