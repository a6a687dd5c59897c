"""The training loop: exact resume, interruption, non-finite loss, accumulation, schedules, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effml.nn import TransformerConfig, TransformerLM
from effml.optim import WarmupCosine
from effml.train import (
    Callback,
    CheckpointError,
    NonFiniteLoss,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    latest_checkpoint,
    load_checkpoint,
)
from effml.train.lm import causal_lm_loss

VOCAB, SEQ = 32, 16


def tiny_model(seed: int = 0, dropout: float = 0.1) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ,
                                           dropout=dropout))


def batches(batch_size: int = 4):
    def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 + index)
        tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]
    return batch


def config(**changes) -> TrainConfig:
    base = dict(steps=12, lr=3e-3, warmup_steps=2, checkpoint_every=4, eval_every=6, log_every=1)
    base.update(changes)
    return TrainConfig(**base)


def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
    loss, _ = causal_lm_loss(model, batches(8)(10**6), step)
    return {"valid_loss": float(loss)}


@pytest.mark.parametrize("backend", ["", "aot_eager"])  # eager, and compiled (aot_eager needs no C compiler)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, backend, interrupt_at) -> None:
    straight = Trainer(tiny_model(), causal_lm_loss, batches(), config(compile=backend), evaluate=evaluate,
                       run_dir=tmp_path / "straight", quiet=True)
    reference = straight.fit()

    interrupted = Trainer(tiny_model(), causal_lm_loss, batches(), config(compile=backend), evaluate=evaluate,
                          run_dir=tmp_path / "split", quiet=True, callbacks=[interrupt_at(6)])
    with pytest.raises(TrainingInterrupted) as stop:
        interrupted.fit()
    # The signal is honoured at the next step boundary: the run stops early and checkpoints where it stopped.
    assert 7 <= stop.value.step < 12 and stop.value.checkpoint.name == f"step-{stop.value.step:08d}"

    # A fresh process would build the model from scratch (another seed, even): the checkpoint must win.
    resumed = Trainer(tiny_model(seed=123), causal_lm_loss, batches(), config(compile=backend), evaluate=evaluate,
                      run_dir=tmp_path / "split", quiet=True, resume=True)
    result = resumed.fit()
    assert result.curves["train_loss"] == reference.curves["train_loss"]
    assert result.curves["valid_loss"] == reference.curves["valid_loss"]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train_loss" in r] == list(range(12))


def test_a_compiled_training_step_follows_the_eager_one_and_checkpoints_plain_names(tmp_path) -> None:
    runs = {backend: Trainer(tiny_model(dropout=0.0), causal_lm_loss, batches(), config(steps=4, compile=backend),
                             run_dir=tmp_path / (backend or "eager"), quiet=True)
            for backend in ("", "aot_eager")}
    assert isinstance(runs["aot_eager"].train_model, torch._dynamo.eval_frame.OptimizedModule)
    losses = {backend: trainer.fit().curves["train_loss"] for backend, trainer in runs.items()}
    for (step_a, loss_a), (step_b, loss_b) in zip(losses[""], losses["aot_eager"], strict=True):
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-5)
    saved = load_checkpoint(tmp_path / "aot_eager" / "checkpoints").model
    assert set(saved) == set(runs[""].model.state_dict())  # no "_orig_mod." prefixes


def test_an_unknown_compile_backend_lists_the_backends() -> None:
    with pytest.raises(ValueError, match=r"train.compile = 'inductr' is not a torch.compile backend: choose one of "
                                         r".*'inductor'.*'aot_eager'"):
        TrainConfig(compile="inductr")


class CrashAfter(Callback):
    """Raises after a given step, as a killed process would stop (no checkpoint of its own)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("crash_after", [7, None])
def test_resume_from_a_checkpoint_at_an_evaluation_step_keeps_that_evaluation(tmp_path, crash_after) -> None:
    """The checkpoint of step 6 is written after step 6's evaluation: a run resumed from it (killed at step 8, or
    resumed once finished) logs every evaluation exactly once, as the uninterrupted run does."""
    settings = config(checkpoint_every=6, eval_every=3)
    reference = Trainer(tiny_model(), causal_lm_loss, batches(), settings, evaluate=evaluate,
                        run_dir=tmp_path / "straight", quiet=True).fit()
    crashed = Trainer(tiny_model(), causal_lm_loss, batches(), settings, evaluate=evaluate, run_dir=tmp_path / "split",
                      quiet=True, callbacks=[CrashAfter(crash_after)] if crash_after is not None else [])
    if crash_after is None:
        crashed.fit()
    else:
        with pytest.raises(KeyboardInterrupt):
            crashed.fit()
    resumed = Trainer(tiny_model(), causal_lm_loss, batches(), settings, evaluate=evaluate, run_dir=tmp_path / "split",
                      quiet=True, resume=True).fit()
    assert [step for step, _ in reference.curves["valid_loss"]] == [3, 6, 9, 12]
    assert resumed.curves["valid_loss"] == reference.curves["valid_loss"]
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "valid_loss" in r] == [3, 6, 9, 12]


class StepCounter(Callback):
    """A stateful callback: counts the steps it has seen, across resumes."""

    def __init__(self) -> None:
        self.count = 0

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int], trainer: Trainer) -> None:
        self.count = state["count"]


def test_callback_states_follow_their_class_when_a_stateless_callback_is_added_on_resume(tmp_path,
                                                                                        interrupt_at) -> None:
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path, quiet=True,
                callbacks=[StepCounter(), CrashAfter(5)]).fit()
    counter = StepCounter()
    Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path, quiet=True, resume=True,
            callbacks=[interrupt_at(10**6), counter]).fit()
    assert counter.count == 12  # 4 steps before the step-4 checkpoint, 8 after it


def test_resume_tolerates_a_metrics_line_cut_short_by_a_kill(tmp_path) -> None:
    reference = Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path / "straight",
                        quiet=True).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path / "split", quiet=True,
                callbacks=[CrashAfter(5)]).fit()
    log = tmp_path / "split" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 6, "train_lo')
    resumed = Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path / "split", quiet=True,
                      resume=True).fit()
    assert resumed.curves["train_loss"] == reference.curves["train_loss"]
    log.write_text('{"step": 0, "train_lo\n' + log.read_text())
    with pytest.raises(CheckpointError, match="line 1, is corrupted"):
        Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path / "split", quiet=True,
                resume=True).fit()


def test_resuming_before_any_checkpoint_starts_afresh_in_a_new_directory(tmp_path) -> None:
    """A run stopped before its first checkpoint, or never started (its directory absent), resumes as a fresh run:
    the log holds only the new run's records."""
    reference = Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path / "straight",
                        quiet=True).fit()
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "metrics.jsonl").write_text('{"step": 0, "train_loss": 99.0}\n')
    for run_dir in (tmp_path / "absent" / "run", tmp_path / "stale"):
        resumed = Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=run_dir, quiet=True,
                          resume=True).fit()
        assert resumed.curves["train_loss"] == reference.curves["train_loss"]
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [record["train_loss"] for record in logged if "train_loss" in record] == [
            loss for _, loss in reference.curves["train_loss"]]


def test_an_interrupt_at_a_checkpoint_step_reuses_that_checkpoint(tmp_path, interrupt_at) -> None:
    """A second save of the same step would delete the directory LATEST names before renaming the new one in."""
    trainer = Trainer(tiny_model(), causal_lm_loss, batches(), config(), run_dir=tmp_path, quiet=True,
                      callbacks=[interrupt_at(2)])  # honoured at the end of step 3: 4 steps done, a checkpoint step
    saves = []
    save = trainer.save
    trainer.save = lambda: saves.append(trainer.step) or save()  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit()
    assert stop.value.step == 4 and saves == [4]
    assert stop.value.checkpoint == latest_checkpoint(tmp_path / "checkpoints")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    def poisoned(model, batch, step):
        loss, metrics = causal_lm_loss(model, batch, step)
        return (loss * float("nan") if step == 9 else loss), metrics

    trainer = Trainer(tiny_model(), poisoned, batches(), config(), run_dir=tmp_path, quiet=True)
    with pytest.raises(NonFiniteLoss, match="step 9.*step-00000008"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.step == 8
    assert all(torch.isfinite(t).all() for t in checkpoint.model.values())


def test_gradient_accumulation_matches_one_large_batch() -> None:
    full = Trainer(tiny_model(dropout=0.0), causal_lm_loss, batches(8), config(steps=4), quiet=True)
    half = batches(4)

    def split(index: int):  # micro-batches 2s and 2s+1 are the two halves of large batch s
        inputs, targets = batches(8)(index // 2)
        rows = slice(0, 4) if index % 2 == 0 else slice(4, 8)
        return inputs[rows], targets[rows]

    accumulated = Trainer(tiny_model(dropout=0.0), causal_lm_loss, split, config(steps=4, grad_accum=2), quiet=True)
    del half
    full.fit(), accumulated.fit()
    for a, b in zip(full.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_warmup_cosine_schedule_endpoints() -> None:
    schedule = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(total_steps=5, warmup_steps=6)


def test_checkpoint_round_trip_keeps_tied_weights_and_detects_corruption(tmp_path) -> None:
    trainer = Trainer(tiny_model(), causal_lm_loss, batches(), config(steps=4), run_dir=tmp_path, quiet=True)
    trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "checkpoints")
    model = tiny_model(seed=5)
    model.load_state_dict(checkpoint.model)
    for a, b in zip(trainer.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    tied = [n for n, p in model.named_parameters()]
    assert len(tied) == len(list(model.parameters()))  # shared tensors stay shared after loading
    assert checkpoint.optimizer["state"]  # Adam moments were saved
    # the settings come back as they were, tuples (Adam's betas) included, though JSON has no tuples
    assert checkpoint.optimizer["param_groups"] == trainer.optimizer.state_dict()["param_groups"]
    assert isinstance(checkpoint.optimizer["param_groups"][0]["betas"], tuple)

    weights = latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupted"):
        load_checkpoint(tmp_path / "checkpoints")

    state_file = latest_checkpoint(tmp_path / "checkpoints") / "state.json"
    state = json.loads(state_file.read_text())
    del state["manifest"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="state.json lacks manifest"):
        load_checkpoint(tmp_path / "checkpoints")


def test_causal_lm_loss_takes_the_logits_of_a_hugging_face_style_output() -> None:
    """A model whose forward returns an output object with ``.logits`` (as Hugging Face's do) gets the same loss as one
    that returns the logits themselves, the explicit cross-entropy over every position."""
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    expected = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()

    class Output:
        def __init__(self, values: torch.Tensor) -> None:
            self.logits = values

    plain, _ = causal_lm_loss(lambda ids: logits, (targets, targets), 0)
    wrapped, _ = causal_lm_loss(lambda ids: Output(logits), (targets, targets), 0)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(wrapped, expected)
