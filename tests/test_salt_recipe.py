"""The `salt` recipe end to end (smoke preset through the CLI), its arms' relations and its config checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from effml.config import ConfigError
from effml.experiments.base import RunContext
from effml.experiments.lm_training import load_byte_corpus
from effml.experiments.salt import SELECTION_FILE, SaltConfig, SaltRecipe
from effml.report import VERDICTS, evaluate_claims
from effml.train import TrainConfig
from effml.train.distributed import World
from effml.train.lm import heldout_nats_per_token

STUDENTS = ["baseline", "kd-throughout", "salt", "salt-ds", "salt-reduced"]


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("salt")


@pytest.fixture(scope="module")
def results(smoke_run: Path) -> dict:
    return json.loads((smoke_run / "results.json").read_text())


def _curve(results: dict, arm: str, seed: str, name: str) -> list[list[float]]:
    return results["arms"][arm]["runs"][seed]["curves"][name]


def test_smoke_run_reports_every_claim_with_a_computed_verdict(smoke_run: Path, results: dict) -> None:
    config = SaltRecipe().preset("smoke")
    assert results["status"] == "complete"
    assert list(results["arms"]) == ["teacher", *STUDENTS]
    for arm in results["arms"].values():
        assert [seed for seed, run in arm["runs"].items() if run["status"] == "complete"] == ["0", "1"]
    claims = evaluate_claims(results)
    assert len(claims) == 5 and {claim.verdict for claim in claims} <= set(VERDICTS)
    assert all(claim.evidence and "not measured" not in claim.evidence for claim in claims)
    report = (smoke_run / "report.md").read_text()
    assert all(claim.name in report for claim in claims)
    assert (smoke_run / "valid_loss.png").stat().st_size > 1000
    corpus = load_byte_corpus(config.corpus, config.max_bytes, World())
    for seed in ("0", "1"):
        # the students' teacher is the trained one: its test loss is the teacher arm's
        teacher = SaltRecipe()._teacher(config, _context(smoke_run, int(seed))).eval()
        test_loss = heldout_nats_per_token(teacher, corpus.test, config.seq_len, config.batch_size, None, World())
        assert test_loss == pytest.approx(results["arms"]["teacher"]["runs"][seed]["metrics"]["test_loss"], rel=1e-6)
        kept = np.load(smoke_run / "salt-ds" / f"seed-{seed}" / SELECTION_FILE)
        assert kept.shape == (config.kd_steps * config.batch_size,)
        for arm in STUDENTS:  # every student arm evaluated at the end of the distillation stage
            assert np.isfinite(results["arms"][arm]["runs"][seed]["metrics"]["valid_loss_at_kd_end"])


def test_salt_follows_kd_throughout_until_the_stage_ends(results: dict) -> None:
    """The two arms share initial weights, batches, schedule and ω up to ``kd_steps``: the same numbers until then,
    different ones after; the baseline (no teacher) differs from the first step."""
    kd_steps = SaltRecipe().preset("smoke").kd_steps
    for seed in ("0", "1"):
        salt, throughout, base = (_curve(results, arm, seed, "valid_loss") for arm in ("salt", "kd-throughout",
                                                                                        "baseline"))
        before = [point for point in salt if point[0] <= kd_steps]
        assert before and before == [point for point in throughout if point[0] <= kd_steps]
        assert salt[-1] != throughout[-1]
        assert salt[0] != base[0]


def test_flops_count_the_teachers_forward_passes_only_while_distilling(results: dict) -> None:
    config = SaltRecipe().preset("smoke")
    tokens = config.batch_size * config.seq_len
    student, teacher = config.flops_per_token["student"], config.flops_per_token["teacher"]
    kd_steps = {"baseline": 0, "kd-throughout": config.train.steps, "salt": config.kd_steps,
                "salt-ds": config.kd_steps, "salt-reduced": config.kd_steps}
    scored = 2 * config.kd_steps * config.batch_size  # SALT_DS scores twice the windows it keeps (keep_fraction 0.5)
    for arm, distilled in kd_steps.items():
        steps = config.reduced_steps if arm == "salt-reduced" else config.train.steps
        flops = results["arms"][arm]["runs"]["0"]["metrics"]["flops"]
        scoring = scored * config.seq_len * teacher / 3 if arm == "salt-ds" else 0.0
        assert flops == pytest.approx((steps * student + distilled * teacher / 3) * tokens + scoring, rel=1e-12)
    derived = results["derived"]["salt-reduced vs baseline"]["runs"]
    for seed, run in derived.items():
        reduced, base = (results["arms"][arm]["runs"][seed]["metrics"] for arm in ("salt-reduced", "baseline"))
        assert run["metrics"]["test_loss_gap"] == reduced["test_loss"] - base["test_loss"]
        assert run["metrics"]["flops_fraction"] == reduced["flops"] / base["flops"]
        assert run["metrics"]["steps_fraction"] == config.reduced_steps / config.train.steps
    assert [step for step, _ in _curve(results, "salt-reduced", "0", "valid_loss")][-1] == config.reduced_steps


def _context(run_dir: Path, seed: int = 0) -> RunContext:
    return RunContext(run_dir=run_dir / "salt-ds" / f"seed-{seed}", seed=seed, device="cpu",
                      world=World(rank=0, world_size=1, local_rank=0))


class _Refuses(torch.nn.Module):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the teacher was asked to score windows already selected")


def test_salt_ds_reuses_its_saved_selection(smoke_run: Path) -> None:
    """On resume the kept windows come from the run directory, not from scoring again."""
    from effml.data import WindowBatches

    config = SaltRecipe().preset("smoke")
    tokens = np.arange(5000) % 256
    base = WindowBatches(tokens, config.batch_size, config.seq_len, seed=0)
    context = _context(smoke_run)
    windows = SaltRecipe()._selected_windows(config, base, _Refuses(), context)
    assert np.array_equal(windows.starts, np.load(context.run_dir / SELECTION_FILE))


def test_a_student_without_its_teacher_says_to_resume(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--resume"):
        SaltRecipe()._teacher(SaltRecipe().preset("smoke"), _context(tmp_path))


def test_a_teacher_checkpoint_short_of_the_teachers_last_step_is_refused(smoke_run: Path) -> None:
    """A student never distils from a partly trained teacher (here: the config asks for one more teacher step)."""
    config = SaltRecipe().preset("smoke")
    longer = dataclasses.replace(config, teacher_train=dataclasses.replace(config.teacher_train,
                                                                           steps=config.teacher_train.steps + 1))
    with pytest.raises(FileNotFoundError, match=f"a checkpoint at step {config.teacher_train.steps},"):
        SaltRecipe()._teacher(longer, _context(smoke_run))


@pytest.mark.parametrize(("change", "message"), [
    ({"train": TrainConfig(steps=20, warmup_steps=2, eval_every=3)}, "eval_every"),
    ({"reduced_fraction": 0.2}, "reduced_fraction"),
    ({"student_size": "48-2"}, "WIDTHxDEPTH"),
    ({"student_size": "0x2"}, "width"),
    ({"teacher_size": "40x1"}, "head_dim"),
    ({"kd_weight": 0.0}, "kd_weight"),
    ({"transition": "cosine"}, "transition"),
])
def test_bad_settings_are_refused_with_the_fix(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SaltRecipe().preset("smoke"), **change)


def test_every_preset_validates() -> None:
    for preset in ("smoke", "cpu", "full"):
        config = SaltRecipe().preset(preset)
        assert isinstance(config, SaltConfig) and 0 < config.kd_steps < config.reduced_steps < config.train.steps
