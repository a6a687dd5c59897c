"""The `softsrv` recipe end to end (smoke preset through the CLI): one shared generator, closed docstring samples, the
reuse of saved samples on resume, and its config checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from effml.config import ConfigError
from effml.experiments.base import RunContext
from effml.experiments.softsrv import CLOSING, SAMPLES_FILE, SoftsrvConfig, SoftsrvRecipe, _target_data
from effml.report import VERDICTS, evaluate_claims
from effml.train.checkpoint import latest_checkpoint, load_checkpoint
from effml.train.distributed import World

ARMS = ["generator", "real-data", "hard-prompt", "nsp", "mp2", "mc"]
SYNTHETIC = ["hard-prompt", "nsp", "mp2", "mc"]


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("softsrv")


@pytest.fixture(scope="module")
def results(smoke_run: Path) -> dict:
    return json.loads((smoke_run / "results.json").read_text())


def _context(run_dir: Path, arm: str, seed: int, resume: bool = False) -> RunContext:
    return RunContext(run_dir=run_dir / arm / f"seed-{seed}", seed=seed, device="cpu", world=World(), resume=resume,
                      quiet=True, shared_seeds={"generator": 0})


def test_smoke_run_reports_every_claim_with_a_computed_verdict(smoke_run: Path, results: dict) -> None:
    assert results["status"] == "complete"
    assert list(results["arms"]) == ARMS
    assert list(results["arms"]["generator"]["runs"]) == ["0"]  # shared: one run for both seeds
    assert not (smoke_run / "generator" / "seed-1").exists()
    for arm in ARMS[1:]:
        assert [seed for seed, run in results["arms"][arm]["runs"].items() if run["status"] == "complete"] == ["0",
                                                                                                              "1"]
    claims = evaluate_claims(results)
    assert len(claims) == 6 and {claim.verdict for claim in claims} <= set(VERDICTS)
    assert all(claim.evidence and "not measured" not in claim.evidence for claim in claims)
    report = (smoke_run / "report.md").read_text()
    assert all(claim.name in report for claim in claims)
    assert (smoke_run / "valid_loss.png").stat().st_size > 1000


def test_every_seed_samples_from_the_one_pretrained_generator(smoke_run: Path) -> None:
    config = SoftsrvRecipe().preset("smoke")
    saved = load_checkpoint(latest_checkpoint(smoke_run / "generator" / "seed-0" / "checkpoints")).model
    for seed in (0, 1):
        generator = SoftsrvRecipe()._generator(config, _context(smoke_run, "nsp", seed))
        assert not generator.training and not any(p.requires_grad for p in generator.parameters())
        for name, value in generator.state_dict().items():
            assert torch.equal(value, saved[name])


def test_samples_are_closed_docstrings_and_the_reference_arm_is_the_target(smoke_run: Path, results: dict) -> None:
    config = SoftsrvRecipe().preset("smoke")
    target = _target_data(config)
    real = results["arms"]["real-data"]["runs"]["0"]["metrics"]
    assert real["n_examples"] == config.target_examples and real["copied_fraction"] == 1.0
    for arm in SYNTHETIC:
        for seed in ("0", "1"):
            raw = json.loads((smoke_run / arm / f"seed-{seed}" / SAMPLES_FILE).read_text())
            assert len(raw) == config.n_samples
            assert all(len(text.encode(errors="surrogateescape")) == config.max_example_bytes for text in raw)
            metrics = results["arms"][arm]["runs"][seed]["metrics"]
            assert metrics["unterminated_fraction"] == sum(CLOSING not in text for text in raw) / len(raw)
            assert 0.0 <= metrics["auc"] <= 1.0 and metrics["n_examples"] == config.n_samples
    assert set(target.train).isdisjoint(target.held_out) and target.held_out
    assert all("\n" not in text for text in target.train + target.held_out)  # one-line docstrings
    sample = json.loads((smoke_run / "nsp" / "seed-0" / SAMPLES_FILE).read_text())
    other = json.loads((smoke_run / "nsp" / "seed-1" / SAMPLES_FILE).read_text())
    assert sample != other  # each seed samples its own


def test_a_resumed_run_reuses_the_samples_and_the_prompts_checkpoint_and_retrains_the_same_student(
        smoke_run: Path, results: dict, tmp_path: Path, monkeypatch) -> None:
    """A run stopped after an arm sampled resumes (through the runner) from its saved samples (sampling again would
    fail here) and its prompt's final checkpoint, and its student, retrained from scratch, measures exactly what the
    uninterrupted run did."""
    from effml.experiments.runner import run_experiment
    from effml.train import Trainer

    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    shutil.rmtree(copy / "mc" / "seed-1" / "student")
    partial = json.loads((copy / "results.json").read_text())
    partial["status"] = "partial"
    del partial["arms"]["mc"]["runs"]["1"]
    (copy / "results.json").write_text(json.dumps(partial))

    def refuse(*args, **kwargs):
        raise AssertionError("sampled again instead of reading the saved samples")

    restored = []
    restore = Trainer._restore

    def spy(trainer: Trainer) -> bool:
        restored.append((trainer.run_dir.relative_to(copy), restore(trainer)))
        return restored[-1][1]

    monkeypatch.setattr("effml.synth.generate_synthetic", refuse)
    monkeypatch.setattr(Trainer, "_restore", spy)
    assert run_experiment("softsrv", resume=copy, quiet=True) == copy
    assert restored == [(Path("mc/seed-1/prompt"), True), (Path("mc/seed-1/student"), False)]
    rerun = json.loads((copy / "results.json").read_text())["arms"]["mc"]["runs"]["1"]["metrics"]
    original = results["arms"]["mc"]["runs"]["1"]["metrics"]
    timings = {"step_time_s", "tokens_per_s"}
    assert {k: v for k, v in rerun.items() if k not in timings} == {k: v for k, v in original.items()
                                                                    if k not in timings}


def test_an_arm_without_its_generator_says_to_resume(tmp_path: Path) -> None:
    config = SoftsrvRecipe().preset("smoke")
    with pytest.raises(FileNotFoundError, match="Resume the run"):
        SoftsrvRecipe()._generator(config, _context(tmp_path, "nsp", 0))


@pytest.mark.parametrize(("change", "message"), [
    ({"max_example_bytes": 250}, "more than the generator's seq_len"),
    ({"hard_prompt": "x" * 40, "max_example_bytes": 224}, "more than the generator's seq_len"),
    ({"mixture_k": 1}, "mixture_k"),
    ({"min_example_bytes": 300}, "exceeds max_example_bytes"),
    ({"generator_size": "100x2"}, "not a multiple of head_dim"),
    ({"top_p": 1.5}, "top_p"),
    ({"hard_prompt": ""}, "hard_prompt is empty"),
])
def test_bad_settings_are_refused_with_the_fix(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SoftsrvConfig(), **change)


def test_too_few_target_docstrings_are_refused_with_the_fix() -> None:
    config = dataclasses.replace(SoftsrvRecipe().preset("smoke"), target_examples=100_000)
    with pytest.raises(ConfigError, match="lower target_examples"):
        _target_data(config)


def test_every_preset_validates() -> None:
    for preset in SoftsrvRecipe.presets:
        config = SoftsrvRecipe().preset(preset)
        assert [arm.name for arm in SoftsrvRecipe().arms(config)] == ARMS


@pytest.mark.slow
def test_two_processes_sample_train_and_measure_as_one_does(results: dict, torchrun_smoke) -> None:
    """Under torchrun the prompts train on halves of each batch, the synthetic samples are the one process's, and the
    students train and score as in one process."""
    torchrun_smoke("softsrv", results)
