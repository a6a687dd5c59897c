"""The `latentcrf` recipe end to end (smoke preset through the CLI), its training data for both CRF stages, and its
config checks."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from effml.config import ConfigError
from effml.diffusion import LatentCRF, UNet, ddim_sample
from effml.experiments.base import RunContext
from effml.experiments.latentcrf import (CLASSIFIER, DENOISER, LATENTCRF, SAMPLER_METRICS, LatentCRFRecipe,
                                         LatentCRFRecipeConfig, _splits)
from effml.report import VERDICTS, evaluate_claims
from effml.train.checkpoint import latest_checkpoint, load_checkpoint
from effml.train.distributed import World

pytest.importorskip("sklearn")  # the digits (effml[images], installed by `make setup`)


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("latentcrf")


@pytest.fixture(scope="module")
def results(smoke_run: Path) -> dict:
    return json.loads((smoke_run / "results.json").read_text())


def _context(run_dir: Path, seed: int) -> RunContext:
    return RunContext(run_dir=run_dir / LATENTCRF / f"seed-{seed}", seed=seed, device="cpu", world=World(),
                      shared_seeds={CLASSIFIER: 0, DENOISER: 0})


def _trained(run_dir: Path, config: LatentCRFRecipeConfig, seed: int) -> tuple[torch.nn.Module, ...]:
    """The run's denoiser, classifier and both CRFs (after stage 1, after stage 2), from their checkpoints."""
    def load(path: Path, model: torch.nn.Module) -> torch.nn.Module:
        model.load_state_dict(load_checkpoint(latest_checkpoint(path / "checkpoints")).model)
        return model.eval()

    crf_dir = run_dir / LATENTCRF / f"seed-{seed}"
    return (load(run_dir / DENOISER / "seed-0", UNet(config.unet_config())),
            load(run_dir / CLASSIFIER / "seed-0", LatentCRFRecipe()._classifier(config)),
            load(crf_dir / "prior", LatentCRF(config.crf_config())),
            load(crf_dir / "distill", LatentCRF(config.crf_config())))


def test_smoke_run_reports_every_claim_and_every_sampler(smoke_run: Path, results: dict) -> None:
    config = LatentCRFRecipe().preset("smoke")
    assert results["status"] == "complete" and list(results["arms"]) == [CLASSIFIER, DENOISER, LATENTCRF]
    assert list(results["arms"][DENOISER]["runs"]) == ["0"]  # shared by the seeds
    assert [seed for seed, run in results["arms"][LATENTCRF]["runs"].items() if run["status"] == "complete"] \
        == ["0", "1"]
    claims = evaluate_claims(results)
    assert len(claims) == 6 and {claim.verdict for claim in claims} <= set(VERDICTS)
    assert all(claim.evidence and "not measured" not in claim.evidence for claim in claims)
    report = (smoke_run / "report.md").read_text()
    assert all(claim.name in report for claim in claims)
    samplers = list(config.samplers())
    assert samplers == ["ddim@10", "ddim@7", "latentcrf@7", "no-crf@7", "prior-crf@7"]
    for seed in ("0", "1"):
        metrics = results["arms"][LATENTCRF]["runs"][seed]["metrics"]
        for sampler in samplers:
            derived = results["derived"][sampler]["runs"][seed]["metrics"]
            assert set(derived) == set(SAMPLER_METRICS)
            assert derived["fid"] == metrics[f"fid@{sampler}"] >= 0
            assert 0 <= derived["accuracy"] <= 100 and 1 <= derived["vendi"] <= config.samples_per_class
        assert metrics["seconds_per_image@ddim@10"] > 0 and metrics["time_ratio@latentcrf@7"] > 0
        assert 0 < metrics["crf_params_fraction"] < 1


def test_diversity_is_decided_only_for_samples_of_the_full_samplers_quality(results: dict) -> None:
    """Leftover noise raises the Vendi score, so "no loss of diversity" needs "no loss of quality" to hold."""
    def verdicts(fid_ratio: float) -> dict[str, str]:
        edited = copy.deepcopy(results)
        for seed in ("0", "1"):
            full = edited["derived"]["ddim@10"]["runs"][seed]["metrics"]
            crf = edited["derived"]["latentcrf@7"]["runs"][seed]["metrics"]
            full.update(fid=1.0, vendi=2.0)
            crf.update(fid=fid_ratio, vendi=3.0)  # more "diverse" on every seed
        return {claim.name: claim.verdict for claim in evaluate_claims(edited)}

    assert verdicts(1.0)["no loss of diversity"] == "holds"
    worse = verdicts(2.0)
    assert worse["no loss of quality"] == "fails" and worse["no loss of diversity"] == "inconclusive"


def test_the_reported_scores_are_the_trained_models(smoke_run: Path, results: dict) -> None:
    recipe, config = LatentCRFRecipe(), LatentCRFRecipe().preset("smoke")
    denoiser, classifier, prior, crf = _trained(smoke_run, config, 1)
    measured = recipe._compare_samplers(config, denoiser, {"latentcrf": crf, "prior-crf": prior}, classifier,
                                        _splits(config), config.noise(), config.crf_schedule(),
                                        _context(smoke_run, 1))
    reported = results["arms"][LATENTCRF]["runs"]["1"]["metrics"]
    for name, value in measured.items():
        if not name.startswith(("seconds_per_image", "time_ratio")):  # (timings differ from run to run)
            assert value == pytest.approx(reported[name], rel=1e-9, abs=1e-12), name


def test_a_resumed_run_keeps_the_prior_retrains_the_distillation_and_measures_the_same(
        smoke_run: Path, results: dict, tmp_path: Path, monkeypatch) -> None:
    """A run stopped during seed 1's distillation resumes (through the runner) from the CRF prior's final checkpoint,
    without training the shared classifier and denoiser again, and measures exactly what the uninterrupted run did."""
    from effml.experiments.runner import run_experiment
    from effml.train import Trainer

    run_copy = tmp_path / "run"
    shutil.copytree(smoke_run, run_copy)
    shutil.rmtree(run_copy / LATENTCRF / "seed-1" / "distill")
    partial = json.loads((run_copy / "results.json").read_text())
    partial["status"] = "partial"
    del partial["arms"][LATENTCRF]["runs"]["1"]
    (run_copy / "results.json").write_text(json.dumps(partial))
    restored = []
    restore = Trainer._restore

    def spy(trainer: Trainer) -> bool:
        restored.append((trainer.run_dir.relative_to(run_copy), restore(trainer)))
        return restored[-1][1]

    monkeypatch.setattr(Trainer, "_restore", spy)
    assert run_experiment("latentcrf", resume=run_copy, quiet=True) == run_copy
    assert restored == [(Path(LATENTCRF, "seed-1", "prior"), True), (Path(LATENTCRF, "seed-1", "distill"), False)]
    rerun = json.loads((run_copy / "results.json").read_text())["arms"][LATENTCRF]["runs"]["1"]["metrics"]
    original = results["arms"][LATENTCRF]["runs"]["1"]["metrics"]

    def untimed(metrics: dict) -> dict:
        return {name: value for name, value in metrics.items()
                if not name.startswith(("seconds_per_image", "time_ratio"))}

    assert untimed(rerun) == untimed(original) and set(rerun) == set(original)


@pytest.mark.slow
def test_two_processes_run_every_arm_and_train_the_denoiser_as_one_does(results: dict, torchrun_smoke) -> None:
    """Under torchrun the U-Net (GroupNorm) trains as in one process; the classifier and the CRF normalise with
    BatchNorm over each rank's share of the batch (README: data parallelism), so their numbers are only checked to be
    measured."""
    ddp = torchrun_smoke("latentcrf", results, arms=(DENOISER,))
    for seed in ("0", "1"):
        assert set(ddp["arms"][LATENTCRF]["runs"][seed]["metrics"]) == set(
            results["arms"][LATENTCRF]["runs"][seed]["metrics"])
    assert {claim.verdict for claim in evaluate_claims(ddp)} <= set(VERDICTS)


def test_distillation_pairs_follow_the_samplers_own_path(smoke_run: Path) -> None:
    recipe, config = LatentCRFRecipe(), LatentCRFRecipe().preset("smoke")
    denoiser = _trained(smoke_run, config, 0)[0]
    schedule, plan = config.noise(), config.crf_schedule()
    inputs, labels, targets = recipe._distillation_pairs(config, denoiser, schedule, plan, _context(smoke_run, 0))
    assert inputs.shape == targets.shape == (config.distill_pairs, 1, config.image_size, config.image_size)
    assert torch.equal(labels, torch.arange(config.distill_pairs) % 10)
    torch.testing.assert_close(targets, ddim_sample(denoiser, inputs, labels, schedule, plan.teacher_levels(schedule)))
    noise_free_start = ddim_sample(denoiser, torch.zeros_like(inputs[:4]), labels[:4], schedule,
                                   plan.head_levels(schedule))
    assert not torch.allclose(inputs[:4], noise_free_start)  # the starts come from drawn noise


def test_prior_batches_noise_real_images_to_the_crf_input_level(tmp_path: Path) -> None:
    recipe = LatentCRFRecipe()
    config = dataclasses.replace(recipe.preset("smoke"), crf_batch_size=256)
    schedule, plan = config.noise(), config.crf_schedule()
    splits = _splits(config)
    batches = recipe._prior_batches(config, splits, schedule, plan, _context(tmp_path, 0))
    noised, labels, clean = batches(5)
    alpha = schedule.alpha_bar(plan.head_levels(schedule)[-1]).item()
    residual = (noised - alpha ** 0.5 * clean) / (1 - alpha) ** 0.5  # the drawn noise
    assert abs(float(residual.mean())) < 0.05 and float(residual.std()) == pytest.approx(1.0, abs=0.05)
    assert clean.min() >= -1 and clean.max() <= 1 and labels.shape == (256,)
    assert torch.equal(batches(5)[0], noised) and not torch.equal(batches(6)[0], noised)


def test_config_errors() -> None:
    base = LatentCRFRecipe().preset("smoke")
    for changes, message in (({"dataset": "fashion-mnist"}, "image_size=28"),
                             ({"image_size": 12}, "multiple of 8"),
                             ({"coarse_run": 2, "resume_step": 1}, "jump from noise level"),
                             ({"coarse_run": 8}, "below coarse_steps"),
                             ({"full_steps": 200}, "DDIM sampler takes between 1 and 100 steps"),
                             ({"dataset": "mnist"}, "dataset")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(base, **changes)
    recipe = LatentCRFRecipe()
    config = dataclasses.replace(base, crf_batch_size=64)
    with pytest.raises(ConfigError, match="exceeds distill_pairs"):
        recipe._distill_batches(config, (torch.zeros(16),) * 3, _context(Path("unused"), 0))
