"""The `padir` recipe end to end (smoke preset through the CLI), its training batches and its config checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from sword_modules import write_toy_verse_pair

from effml.config import ConfigError
from effml.data.tasks import SyntheticTranslation, VerseTranslation, derive_seed
from effml.experiments.base import RunContext
from effml.experiments.padir import AR, DISTILLED, NAR, PadirConfig, PadirRecipe, Seq2SeqBatch, _teacher_forced
from effml.report import VERDICTS, evaluate_claims
from effml.train.distributed import World


@pytest.fixture(scope="module")
def smoke_run(run_smoke) -> Path:
    return run_smoke("padir")


@pytest.fixture(scope="module")
def results(smoke_run: Path) -> dict:
    return json.loads((smoke_run / "results.json").read_text())


def _context(run_dir: Path, seed: int, world: World | None = None) -> RunContext:
    return RunContext(run_dir=run_dir / DISTILLED / f"seed-{seed}", seed=seed, device="cpu", world=world or World())


def test_smoke_run_reports_every_claim_and_every_decoding(smoke_run: Path, results: dict) -> None:
    config = PadirRecipe().preset("smoke")
    assert results["status"] == "complete" and list(results["arms"]) == [AR, NAR, DISTILLED]
    for arm in results["arms"].values():
        assert [seed for seed, run in arm["runs"].items() if run["status"] == "complete"] == ["0", "1"]
    claims = evaluate_claims(results)
    assert len(claims) == 7 and {claim.verdict for claim in claims} <= set(VERDICTS)
    assert all(claim.evidence and "not measured" not in claim.evidence for claim in claims)
    report = (smoke_run / "report.md").read_text()
    assert all(claim.name in report for claim in claims)
    assert (smoke_run / "bleu_vs_iterations.png").stat().st_size > 1000
    for seed in ("0", "1"):
        for arm in (NAR, DISTILLED):
            metrics = results["arms"][arm]["runs"][seed]["metrics"]
            for suffix in ("@1", "@2", "@2+stutter"):
                assert 0 <= metrics[f"bleu{suffix}"] <= 100 and 0 <= metrics[f"exact_match{suffix}"] <= 1
                derived = results["derived"][f"{arm}{suffix}"]["runs"][seed]["metrics"]
                assert derived["bleu"] == metrics[f"bleu{suffix}"]
        # the smoke preset trains the NAR arms in two stages (PaDIR's multi-stage training), the AR arm in one
        logged = {arm: json.loads((smoke_run / arm / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()[0])
                  for arm in (AR, NAR, DISTILLED)}
        assert "token_loss_stage2" not in logged[AR] and all(logged[arm]["token_loss_stage2"] > 0
                                                             for arm in (NAR, DISTILLED))
        timed = results["arms"][DISTILLED]["runs"][seed]["metrics"]
        for size in config.timing_batch_sizes:
            assert timed[f"decode_s_ar_b{size}"] > 0 and timed[f"speedup@2_b{size}"] > 0


def assert_reported_bleu_is_the_teacher_s(config: PadirConfig, run_dir: Path, results: dict) -> torch.nn.Module:
    """Seed 0's AR model, reloaded from ``run_dir``, scores the BLEU the run reported; returns it."""
    task = config.task()
    teacher = PadirRecipe()._teacher(config, _context(run_dir, 0))
    measured = task.evaluate(PadirRecipe._ar_predict(teacher, task, "cpu"), config.eval_examples,
                             derive_seed(0, 2_000_003), batch_size=config.eval_batch_size)
    assert measured["bleu"] == pytest.approx(results["arms"][AR]["runs"]["0"]["metrics"]["bleu"], abs=1e-9)
    return teacher


def assert_distilled_targets_are_the_teacher_s(config: PadirConfig, context: RunContext,
                                               teacher: torch.nn.Module) -> tuple[Seq2SeqBatch, Seq2SeqBatch]:
    """The distilled arm's batch 3 holds the NAR arm's sources with the teacher's greedy translations as targets;
    returns (NAR batch, distilled batch)."""
    recipe, task = PadirRecipe(), config.task()
    raw = recipe.training_batches(config, NAR, context)(3)
    distilled = recipe.training_batches(config, DISTILLED, context, teacher)(3)
    assert torch.equal(raw.sources, distilled.sources)
    translated, lengths = recipe._translate(teacher, task, raw.sources, "cpu")
    assert torch.equal(distilled.lengths, lengths)
    assert torch.equal(distilled.targets, translated[:, :distilled.targets.shape[1]].masked_fill(
        distilled.target_padding, task.pad_id))
    return raw, distilled


def test_the_reported_bleu_is_the_trained_model_s(smoke_run: Path, results: dict) -> None:
    assert_reported_bleu_is_the_teacher_s(PadirRecipe().preset("smoke"), smoke_run, results)


def test_the_distilled_arm_trains_on_the_teacher_s_translations(smoke_run: Path) -> None:
    recipe, config = PadirRecipe(), PadirRecipe().preset("smoke")
    context = _context(smoke_run, 1)
    task = config.task()
    raw, distilled = assert_distilled_targets_are_the_teacher_s(config, context, recipe._teacher(config, context))
    sample = task.sample(config.batch_size, derive_seed(1, 3))
    assert torch.equal(raw.lengths, sample.target_lengths)
    assert torch.equal(raw.targets, sample.targets[:, :raw.targets.shape[1]])
    # the corruption leaves un-noised positions as they were and never touches padding
    for batch in (raw, distilled):
        assert torch.equal(batch.decoder_inputs[batch.target_padding], batch.targets[batch.target_padding])
        assert torch.equal(batch.loss_mask, ~batch.target_padding)  # loss_weighting "all"


def test_two_ranks_train_on_the_halves_of_the_one_process_batch(tmp_path: Path) -> None:
    recipe, config = PadirRecipe(), PadirRecipe().preset("smoke")
    for arm in (AR, NAR):
        whole = recipe.training_batches(config, arm, _context(tmp_path, 0))(5)
        halves = [recipe.training_batches(config, arm, _context(tmp_path, 0, World(rank, 2)))(5) for rank in (0, 1)]
        for name in ("sources", "decoder_inputs", "targets", "loss_mask", "lengths"):
            assert torch.equal(torch.cat([getattr(half, name) for half in halves]), getattr(whole, name))


def test_the_verses_task_runs_end_to_end_on_a_sword_library(run_smoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """``data=verses``: real-text pairs from the SWORD modules under $SWORD_PATH (toy ones here), scored on the
    held-out book, with the claims worded for them."""
    from effml.cli import main

    write_toy_verse_pair(tmp_path)
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    run_dir = run_smoke("padir", "--set", "data=verses", "--set", "max_tokens=24", "--set", "bpe_vocab=300")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["config"]["data"] == "verses"
    claims = evaluate_claims(results)
    assert len(claims) == 7 and all(claim.evidence and "not measured" not in claim.evidence for claim in claims)
    assert "trained on the KJV→WEB verses" in claims[0].statement
    config = dataclasses.replace(PadirRecipe().preset("smoke"), data="verses", max_tokens=24, bpe_vocab=300)
    task = config.task()
    assert task == VerseTranslation(max_length=24, bpe_vocab=300) and task.split_sizes()["test"] == (22, 0)
    teacher = assert_reported_bleu_is_the_teacher_s(config, run_dir, results)  # all 22 held-out pairs
    # resumed where the modules are missing, a run still to do stops with the install command, not a traceback
    unfinished = dict(results, status="partial")
    del unfinished["arms"][DISTILLED]["runs"]["1"]
    (run_dir / "results.json").write_text(json.dumps(unfinished))
    monkeypatch.setenv("SWORD_PATH", str(tmp_path / "no-library"))
    assert main(["run", "padir", "--quiet", "--resume", str(run_dir)]) == 2
    assert "apt-get install -y sword-text-kjv sword-text-web" in capsys.readouterr().err
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    # the distilled arm's targets: the teacher's translations of the training set, made once, looked up per batch
    assert_distilled_targets_are_the_teacher_s(config, _context(run_dir, 0), teacher)
    batches = PadirRecipe().training_batches(config, DISTILLED, _context(run_dir, 0), teacher)
    monkeypatch.setattr(PadirRecipe, "_translate", staticmethod(lambda *args: pytest.fail("translated per batch")))
    assert batches(5).targets.shape[0] == config.batch_size


def test_missing_sword_modules_stop_the_run_before_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    from effml.cli import main

    monkeypatch.setenv("SWORD_PATH", str(tmp_path / "no-library"))
    out = tmp_path / "runs"
    assert main(["run", "padir", "--preset", "smoke", "--set", "data=verses", "--out", str(out)]) == 2
    assert "apt-get install -y sword-text-kjv sword-text-web" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_two_processes_train_and_score_as_one_does(results: dict, torchrun_smoke) -> None:
    """Under torchrun each rank takes half of every global batch (the distilled arm's teacher translations too) and
    scores half of the held-out sources, whose sums are gathered: every arm's numbers are one process's."""
    torchrun_smoke("padir", results)


def test_teacher_forcing_puts_bos_first_and_eos_after_each_target() -> None:
    task = SyntheticTranslation(n_symbols=4, n_ambiguous=0, min_length=1, max_length=4)
    a, b, c, d = (task.target_offset + i for i in range(4))
    targets = torch.tensor([[a, b, c, 0], [d, 0, 0, 0]])
    batch = _teacher_forced(task, torch.ones(2, 4, dtype=torch.long), targets, torch.tensor([3, 1]))
    bos, eos = task.bos_id, task.eos_id
    assert batch.decoder_inputs.tolist() == [[bos, a, b, c], [bos, d, 0, 0]]
    assert batch.targets.tolist() == [[a, b, c, eos], [d, eos, 0, 0]]
    assert batch.loss_mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_the_loss_survives_an_empty_teacher_output_and_an_empty_selection() -> None:
    from effml.experiments.padir import _corrupted, seq2seq_loss
    from effml.nn import EncoderDecoder

    config = dataclasses.replace(PadirRecipe().preset("smoke"), loss_weighting="masked")
    task = config.task()
    sample = task.sample(4, 0)
    lengths = sample.target_lengths.clone()
    lengths[1] = 0  # a teacher that emitted EOS first
    batch = _corrupted(config, task, sample.sources, sample.targets, lengths, torch.Generator().manual_seed(0))
    assert not batch.target_padding.all(dim=1).any() and not batch.loss_mask[1].any()
    torch.manual_seed(0)
    model = EncoderDecoder(config.model_config(causal=False))
    loss, _ = seq2seq_loss(0.1)(model, batch, 0)
    assert torch.isfinite(loss)
    nothing = dataclasses.replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))
    loss, metrics = seq2seq_loss(0.1)(model, nothing, 0)
    assert metrics["token_loss"].item() == 0.0 and torch.isfinite(loss)


def test_multi_stage_training_adds_the_loss_of_restoring_the_target_from_the_first_stage_s_argmax() -> None:
    from effml.experiments.padir import _corrupted, seq2seq_loss
    from effml.nn import EncoderDecoder

    # (stage 1 counts the [MASK]ed positions only, so that stage 2's "every target position" differs from them)
    config = dataclasses.replace(PadirRecipe().preset("smoke"), loss_weighting="masked")
    task = config.task()
    sample = task.sample(8, 0)
    batch = _corrupted(config, task, sample.sources, sample.targets, sample.target_lengths,
                       torch.Generator().manual_seed(0))
    inside = torch.arange(batch.targets.shape[1])[None, :] < batch.lengths[:, None]
    assert (batch.loss_mask != inside).any()
    torch.manual_seed(0)
    model = EncoderDecoder(config.model_config(causal=False))
    specials = tuple(range(task.target_offset))
    one, one_metrics = seq2seq_loss(0.1)(model, batch, 0)
    two, two_metrics = seq2seq_loss(0.1, train_stages=2, suppress_ids=specials)(model, batch, 0)

    # written out: stage 1 as a single-stage loss, then the decoder fed stage 1's argmax over the target ids only
    logits, length_logits = model(batch.sources, batch.decoder_inputs, batch.source_padding, batch.target_padding,
                                  with_length_logits=True)
    stage1 = torch.nn.functional.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])
    length = torch.nn.functional.cross_entropy(length_logits, batch.lengths)
    predicted = logits.detach().clone()
    predicted[..., list(specials)] = float("-inf")
    fed = torch.where(inside, predicted.argmax(-1), batch.decoder_inputs)
    logits2 = model(batch.sources, fed, batch.source_padding, batch.target_padding)
    stage2 = torch.nn.functional.cross_entropy(logits2[inside], batch.targets[inside])
    assert one.item() == pytest.approx((stage1 + 0.1 * length).item(), rel=1e-6)
    assert two.item() == pytest.approx((stage1 + stage2 + 0.1 * length).item(), rel=1e-6)
    assert two_metrics["token_loss"] == one_metrics["token_loss"] and "token_loss_stage2" not in one_metrics
    assert two_metrics["token_loss_stage2"].item() == pytest.approx(stage2.item(), rel=1e-6)
    # gradients: stage 1's plus stage 2's through its own forward pass (none through the argmax)
    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True))

    from_stage2 = gradients(stage2)
    expected = [a + b for a, b in zip(gradients(one), from_stage2, strict=True)]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(gradients(two), expected, strict=True))
    assert sum(float(g.abs().sum()) for g in from_stage2) > 0


def test_drop_repeats_reaches_the_decoder() -> None:
    from effml.nn import EncoderDecoder

    config = dataclasses.replace(PadirRecipe().preset("smoke"), drop_repeats=True)
    task = config.task()
    torch.manual_seed(0)
    model = EncoderDecoder(config.model_config(causal=False)).eval()
    batch = task.sample(32, 0)
    kept = PadirRecipe._nar_predict(config, model, task, "cpu", 2, "linear")(batch)
    every = PadirRecipe._nar_predict(dataclasses.replace(config, drop_repeats=False), model, task, "cpu", 2,
                                     "linear")(batch)
    assert kept == [[t for i, t in enumerate(row) if i == 0 or t != row[i - 1]] for row in every] != every


@pytest.mark.parametrize(("overrides", "match"), [
    ({"iterations": (1, 2), "claim_iterations": 4}, "claim_iterations"),
    ({"iterations": (4,), "claim_iterations": 4}, "smaller count"),
    ({"timing_batch_sizes": (8, 1)}, "timing_batch_sizes"),
    ({"remasking": "linear+bogus"}, "remasking"),
    ({"keep_prob": 0.6, "random_prob": 0.6}, "keep_prob"),
    ({"loss_weighting": "some"}, "loss_weighting"),
    ({"second_spelling_tokens": 3}, "second_spelling_tokens"),
    ({"min_length": 13}, "min_length"),
    ({"length_candidates": 13}, "length_candidates"),
    ({"data": "wmt"}, "padir.data = 'wmt' is not allowed"),
    ({"dropout": 1.0}, "dropout"),
    ({"train_stages": 0}, "train_stages"),
])
def test_bad_configs_are_refused_with_the_field_named(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(PadirConfig(), **overrides)
