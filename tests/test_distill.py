"""SALT (``effml.train.distill``): the distillation loss against a float64 reference, the ω schedule, the Trainer loss
function and its teacher, SALT_DS's learnability scores, and the selected-window batch source (also over 2 ranks)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effml.train.distill as distill
from effml.config import ConfigError
from effml.data.batches import WindowBatches, windows_to_tensors
from effml.nn import TransformerConfig, TransformerLM
from effml.train import TrainConfig, Trainer, TrainingInterrupted
from effml.train.distill import (
    DistillationLoss,
    KDSchedule,
    SelectedWindows,
    distillation_loss,
    learnability_scores,
    score_windows,
)
from effml.train.distributed import World

VOCAB, SEQ = 16, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- helpers -----------------------------------------------------------------------------------------------------------
def random_logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def random_targets(batch: int, length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    """log p over the last axis, written out: z − max − log Σ exp(z − max)."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, weight: float, tau: float,
                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean CE, mean τ²·KL) over the non-ignored tokens, per token, in float64 (student keeps its graph)."""
    vocab = student.shape[-1]
    student, teacher, targets = student.reshape(-1, vocab), teacher.double().reshape(-1, vocab), targets.reshape(-1)
    ce_terms, kd_terms = [], []
    for row in range(len(targets)):
        target = int(targets[row])
        if target == ignore_index:
            continue
        ce_terms.append(-log_softmax64(student[row])[target])
        log_p_teacher, log_p_student = log_softmax64(teacher[row] / tau), log_softmax64(student[row] / tau)
        kd_terms.append(tau ** 2 * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum())
    ce, kd = torch.stack(ce_terms), torch.stack(kd_terms)
    return ((1 - weight) * ce + weight * kd).mean(), ce.mean(), kd.mean()


def tiny_lm(seed: int, d_model: int = 32, n_layers: int = 1, dropout: float = 0.0, vocab: int = VOCAB) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=2,
                                           max_seq_len=SEQ, dropout=dropout))


class Recording(nn.Module):
    """Wraps a model; records (its training flag, whether autograd was on) at each call; with ``hf`` returns the
    logits as ``.logits`` of an output object, as Hugging Face causal LMs do."""

    def __init__(self, inner: nn.Module, hf: bool = False) -> None:
        super().__init__()
        self.inner, self.hf, self.calls = inner, hf, []

    def forward(self, inputs: torch.Tensor):
        self.calls.append((self.training and self.inner.training, torch.is_grad_enabled()))
        logits = self.inner(inputs)
        return SimpleNamespace(logits=logits) if self.hf else logits


def lm_batch(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = random_targets(batch, SEQ + 1, seed)
    return tokens[:, :-1], tokens[:, 1:]


# -- distillation_loss -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.5])
def test_distillation_loss_and_its_gradient_match_a_float64_reference(weight, tau):
    """Loss, its "ce"/"kd" parts and d loss / d student logits equal the written-out per-token formula."""
    student, teacher = random_logits(3, 5, VOCAB, seed=1), random_logits(3, 5, VOCAB, seed=2, scale=3.0)
    targets = random_targets(3, 5, seed=3)
    targets[0, 1] = targets[2, 4] = -100
    student = student.requires_grad_()
    loss, parts = distillation_loss(student, teacher, targets, weight, tau)
    loss.backward()

    student64 = student.detach().double().requires_grad_()
    expected, ce, kd = reference_loss(student64, teacher, targets, weight, tau)
    expected.backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    if weight > 0:
        assert parts["kd"] == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-7)
    # the two parts are the two terms
    assert loss.item() == pytest.approx((1 - weight) * parts["ce"] + weight * parts["kd"], rel=1e-5, abs=1e-6)


def test_zero_weight_is_exactly_cross_entropy_and_needs_no_teacher():
    """ω = 0: bitwise F.cross_entropy over the flattened tokens, kd part 0.0, teacher may be None."""
    student, targets = random_logits(2, 6, VOCAB, seed=4), random_targets(2, 6, seed=5)
    loss, parts = distillation_loss(student, None, targets, 0.0, temperature=3.0)
    assert torch.equal(loss, F.cross_entropy(student.flatten(0, 1), targets.flatten()))
    assert parts == {"ce": loss.item(), "kd": 0.0}


def test_a_teacher_equal_to_the_student_adds_no_kl():
    """p_T = p_S at every temperature: kd == 0 and the loss is (1 − ω)·CE."""
    student, targets = random_logits(2, 6, VOCAB, seed=6), random_targets(2, 6, seed=7)
    ce = F.cross_entropy(student.flatten(0, 1), targets.flatten())
    for tau in (0.7, 1.0, 2.0):
        loss, parts = distillation_loss(student, student.clone(), targets, 0.4, tau)
        assert parts["kd"] == pytest.approx(0.0, abs=1e-6)
        assert float(loss) == pytest.approx(0.6 * float(ce), rel=1e-6)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ignored_positions_count_for_nothing(ignore_index):
    """Ignored tokens' logits change nothing and get no gradient; the loss is the loss over the scored tokens alone."""
    student, teacher = random_logits(2, 6, VOCAB, seed=8), random_logits(2, 6, VOCAB, seed=9)
    targets = random_targets(2, 6, seed=10)
    ignored = torch.zeros(2, 6, dtype=torch.bool)
    ignored[0, :2] = ignored[1, 5] = True
    targets[ignored] = ignore_index

    def loss_of(student_logits, teacher_logits):
        student_logits = student_logits.clone().requires_grad_()
        loss, parts = distillation_loss(student_logits, teacher_logits, targets, 0.5, 2.0, ignore_index)
        loss.backward()
        return loss.detach(), parts, student_logits.grad

    loss, parts, grad = loss_of(student, teacher)
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[ignored] = random_logits(int(ignored.sum()), VOCAB, seed=11, scale=10.0)
    changed_teacher[ignored] = random_logits(int(ignored.sum()), VOCAB, seed=12, scale=10.0)
    other_loss, other_parts, _ = loss_of(changed_student, changed_teacher)
    assert torch.equal(loss, other_loss) and parts == other_parts
    assert torch.all(grad[ignored] == 0) and torch.all(grad[~ignored].abs().sum(-1) > 0)
    kept = ~ignored
    alone, alone_parts = distillation_loss(student[kept][None], teacher[kept][None], targets[kept][None], 0.5, 2.0)
    assert float(loss) == pytest.approx(float(alone), rel=1e-6)
    assert parts == pytest.approx(alone_parts, rel=1e-6)


def test_distillation_loss_rejects_bad_arguments():
    """Another vocabulary, ω ∉ [0, 1], τ ≤ 0, or a missing teacher with ω > 0 raise ValueError."""
    student, targets = random_logits(2, 4, VOCAB, seed=13), random_targets(2, 4, seed=14)
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(student, random_logits(2, 4, VOCAB + 3, seed=15), targets, 0.5)
    for weight in (-0.1, 1.5):
        with pytest.raises(ValueError, match="kd_weight"):
            distillation_loss(student, student, targets, weight)
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            distillation_loss(student, student, targets, 0.5, tau)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(student, None, targets, 0.5)


# -- KDSchedule --------------------------------------------------------------------------------------------------------
def weights(schedule: KDSchedule, steps) -> list[float]:
    return [schedule.weight_at(step) for step in steps]


def test_step_schedule_keeps_the_weight_until_kd_steps_then_zero():
    """"step": ω on steps 0 .. kd_steps − 1, exactly 0.0 from kd_steps on."""
    assert weights(KDSchedule(weight=0.3, kd_steps=4), range(7)) == [0.3] * 4 + [0.0] * 3


def test_linear_schedule_decays_to_zero_at_kd_steps():
    """"linear": ω at 0, ω/2 at kd_steps/2, ω(1 − t/kd_steps) between, 0 at kd_steps and after."""
    schedule = KDSchedule(weight=0.8, kd_steps=10, transition="linear")
    assert weights(schedule, [0, 5, 10, 11, 1000]) == pytest.approx([0.8, 0.4, 0.0, 0.0, 0.0])
    assert weights(schedule, range(10)) == pytest.approx([0.8 * (1 - t / 10) for t in range(10)])


def test_without_kd_steps_the_weight_holds_for_the_whole_run():
    """kd_steps=None: ω at every step, whatever the transition."""
    for transition in ("step", "linear"):
        assert weights(KDSchedule(weight=0.5, transition=transition), [0, 1, 10**6]) == [0.5] * 3


@pytest.mark.parametrize("changes", [dict(weight=0.0), dict(weight=1.5), dict(weight=-0.2), dict(kd_steps=0),
                                     dict(kd_steps=-3), dict(transition="cosine")])
def test_schedule_rejects_bad_settings(changes):
    """ω ∉ (0, 1], kd_steps ≤ 0 and an unknown transition raise ConfigError (a ValueError)."""
    with pytest.raises(ConfigError) as error:
        KDSchedule(**{"kd_steps": 5, **changes})
    assert isinstance(error.value, ValueError)


# -- DistillationLoss --------------------------------------------------------------------------------------------------
def test_the_teacher_runs_only_while_the_weight_is_positive_frozen_and_in_eval_mode():
    """Teacher calls on steps with ω_t > 0 only, without autograd, in eval mode; it gets no gradient; the loss and
    metrics are distillation_loss's on the same logits; after the stage the loss is plain cross-entropy."""
    student, teacher = tiny_lm(0), Recording(tiny_lm(1, d_model=16, dropout=0.3))
    loss_fn = DistillationLoss(teacher, KDSchedule(weight=0.6, kd_steps=3, transition="linear"), temperature=2.0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    inputs, targets = lm_batch(20)
    with torch.no_grad():
        teacher_logits = teacher.inner(inputs)
    for step in range(6):
        loss, metrics = loss_fn(student, (inputs, targets), step)
        weight = 0.6 * (1 - step / 3) if step < 3 else 0.0
        assert len(teacher.calls) == min(step + 1, 3)
        expected, parts = distillation_loss(student(inputs), teacher_logits if weight else None, targets, weight, 2.0)
        assert metrics["kd_weight"] == pytest.approx(weight)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert metrics["ce"] == pytest.approx(parts["ce"], rel=1e-6) and metrics["kd"] == pytest.approx(parts["kd"])
        if step == 1:
            assert metrics["kd"] > 0
        loss.backward()
    assert metrics["kd"] == 0.0 and teacher.calls == [(False, False)] * 3
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_distillation_loss_function_reads_hugging_face_style_outputs():
    """Model and teacher returning an object with ``.logits`` give the loss of the plain modules."""
    student, teacher = tiny_lm(2), tiny_lm(3, d_model=16)
    batch = lm_batch(21)
    plain, plain_metrics = DistillationLoss(teacher, KDSchedule(weight=0.5))(student, batch, 0)
    wrapped, wrapped_metrics = DistillationLoss(Recording(teacher, hf=True), KDSchedule(weight=0.5))(
        Recording(student, hf=True), batch, 0)
    assert torch.equal(plain, wrapped) and plain_metrics == wrapped_metrics and plain_metrics["kd"] > 0


def test_distillation_loss_function_rejects_a_non_positive_temperature():
    """τ = 0 raises ConfigError when the loss function is built."""
    with pytest.raises(ConfigError):
        DistillationLoss(tiny_lm(0), KDSchedule(), temperature=0.0)


def test_trainer_trains_with_the_distillation_loss_and_logs_the_weight(tmp_path):
    """A short Trainer run: ω logged per step, the teacher called on the distillation stage's micro-batches only
    and left untouched, the student trained."""
    student, inner = tiny_lm(4, dropout=0.1), tiny_lm(5, d_model=16)
    teacher = Recording(inner)
    before = {name: value.clone() for name, value in inner.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    loss_fn = DistillationLoss(teacher, KDSchedule(weight=0.5, kd_steps=2), temperature=2.0)
    config = TrainConfig(steps=4, lr=3e-3, warmup_steps=1, log_every=1, grad_accum=2)
    result = Trainer(student, loss_fn, lambda index: lm_batch(100 + index), config, run_dir=tmp_path,
                     quiet=True).fit()
    assert result.curves["kd_weight"] == [[0, 0.5], [1, 0.5], [2, 0.0], [3, 0.0]]
    assert [value for _, value in result.curves["kd"]][2:] == [0.0, 0.0]
    assert all(value > 0 for _, value in result.curves["kd"][:2])
    assert teacher.calls == [(False, False)] * 4  # 2 steps × 2 micro-batches
    assert all(torch.equal(value, before[name]) for name, value in inner.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), student_before, strict=True))


# -- learnability_scores -----------------------------------------------------------------------------------------------
def reference_scores(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> list[float]:
    """Per row: the teacher's losses where the true token ranks < top_k, then their lower median; −inf if none."""
    scores = []
    for row_logits, row_targets in zip(logits.double().tolist(), targets.tolist(), strict=True):
        losses = []
        for values, target in zip(row_logits, row_targets, strict=True):
            rank = sum(value > values[target] for value in values)
            if rank < top_k:
                top = max(values)
                losses.append(top + math.log(sum(math.exp(v - top) for v in values)) - values[target])
        scores.append(sorted(losses)[(len(losses) - 1) // 2] if losses else -math.inf)
    return scores


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_learnability_scores_match_a_pure_python_reference(top_k):
    """Random logits (odd and even numbers of learnable positions): the float32 scores equal the reference."""
    logits, targets = random_logits(12, 9, VOCAB, seed=30), random_targets(12, 9, seed=31)
    scores = learnability_scores(logits, targets, top_k)
    assert scores.shape == (12,) and scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(reference_scores(logits, targets, top_k), rel=1e-5)


def test_top_k_at_least_the_vocabulary_keeps_every_position():
    """top_k ≥ V: the score is the lower median of all the row's losses."""
    logits, targets = random_logits(5, 6, VOCAB, seed=32), random_targets(5, 6, seed=33)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    for top_k in (VOCAB, VOCAB + 7):
        torch.testing.assert_close(learnability_scores(logits, targets, top_k), losses.median(dim=1).values)


def logits_with_target_probability(probabilities: list[float], target: int, vocab: int) -> torch.Tensor:
    """(T, V) logits: p(target) as given at each position, the rest spread evenly over the other tokens."""
    rows = []
    for p in probabilities:
        row = torch.full((vocab,), math.log((1 - p) / (vocab - 1)), dtype=torch.float64)
        row[target] = math.log(p)
        rows.append(row)
    return torch.stack(rows).float()


def test_learnability_scores_on_hand_built_logits():
    """Known answers: all positions top-1 (lower median of 4 losses, not the mean nor the upper median); no
    learnable position (−inf); only some positions learnable (median over those alone)."""
    vocab = 5
    top1 = logits_with_target_probability([0.5, 0.25, 0.8, 0.4], target=2, vocab=vocab)  # 0.25 > 0.75 / 4
    last = logits_with_target_probability([0.05, 0.01, 0.1, 0.02], target=2, vocab=vocab)  # below the others' share
    mixed = torch.cat([top1[[0, 2]], last[:2]])  # learnable at positions 0 and 1 only
    logits, targets = torch.stack([top1, last, mixed]), torch.full((3, 4), 2)
    scores = learnability_scores(logits, targets, top_k=2)
    assert scores[0].item() == pytest.approx(-math.log(0.5), rel=1e-6)
    assert scores[1].item() == -math.inf
    assert scores[2].item() == pytest.approx(-math.log(0.8), rel=1e-6)  # lower of {−log 0.5, −log 0.8}


def test_learnability_scores_reject_a_non_positive_top_k():
    """top_k = 0 raises ConfigError."""
    with pytest.raises(ConfigError):
        learnability_scores(random_logits(1, 2, VOCAB, seed=34), random_targets(1, 2, seed=35), top_k=0)


# -- score_windows -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(7).integers(0, VOCAB, size=600).astype(np.uint16)


def test_score_windows_scores_each_window_as_on_its_own_at_any_batch_size(tokens):
    """Scores (float64, (N,)) equal learnability_scores of each window alone, for batch sizes 1, 3 and > N."""
    teacher = tiny_lm(6, dropout=0.2).train()  # score_windows must put it in eval mode
    starts = np.random.default_rng(8).integers(0, len(tokens) - SEQ, size=7)
    frozen, alone = copy.deepcopy(teacher).eval(), []
    with torch.no_grad():
        for start in starts:
            inputs, targets = windows_to_tensors(tokens, np.array([start]), SEQ)
            alone.append(learnability_scores(frozen(inputs), targets, top_k=4).item())
    for batch_size in (1, 3, 50):
        scores = score_windows(teacher, tokens, starts, SEQ, batch_size, top_k=4)
        assert scores.dtype == np.float64 and scores.shape == (7,)
        np.testing.assert_allclose(scores, alone, rtol=1e-5)
    assert score_windows(teacher, tokens, starts[:0], SEQ, 4).shape == (0,)


# -- SelectedWindows ---------------------------------------------------------------------------------------------------
BATCH = 4


def base_batches(tokens: np.ndarray, batch_size: int = BATCH) -> WindowBatches:
    return WindowBatches(tokens, batch_size=batch_size, seq_len=SEQ, seed=3)


def fake_score(starts: np.ndarray) -> np.ndarray:
    """A score we control: a function of the start alone, with many ties and some −inf."""
    scores = (starts % 7).astype(np.float64)
    scores[starts % 11 == 0] = -np.inf
    return scores


@pytest.fixture
def controlled_scores(monkeypatch):
    """Replace score_windows with ``fake_score``; returns the list of start arrays it was asked to score."""
    asked: list[np.ndarray] = []

    def scoring(teacher, tokens, starts, seq_len, batch_size, top_k=10, device="cpu"):
        asked.append(np.array(starts))
        return fake_score(np.asarray(starts))

    monkeypatch.setattr(distill, "score_windows", scoring)
    return asked


def expected_selection(candidates: np.ndarray, scores: np.ndarray, needed: int) -> np.ndarray:
    """The ``needed`` best candidates (higher score first, earlier candidate first on ties), in candidate order."""
    best = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))[:needed]
    return candidates[sorted(best)]


@pytest.mark.parametrize("keep_fraction", [0.25, 0.5, 1.0])
def test_selection_keeps_the_top_share_of_the_candidates_in_their_order(tokens, controlled_scores, keep_fraction):
    """All candidates are scored once; the kept starts are the top keep_fraction by score, in candidate order."""
    selected = SelectedWindows(base_batches(tokens), object(), selected_batches=3, world=World(),
                               keep_fraction=keep_fraction, seed=5)
    [candidates] = controlled_scores
    assert len(candidates) == round(12 / keep_fraction)
    assert np.all((candidates >= 0) & (candidates < len(tokens) - SEQ))
    assert len(np.unique(fake_score(candidates))) > 2  # the scores do discriminate
    assert selected.starts.dtype == np.int64
    np.testing.assert_array_equal(selected.starts, expected_selection(candidates, fake_score(candidates), 12))
    if keep_fraction == 1.0:
        np.testing.assert_array_equal(selected.starts, candidates)
    else:  # nothing left out scores above anything kept
        assert np.sort(fake_score(candidates))[-12] == fake_score(selected.starts).min()


def test_selection_depends_on_its_seed_only(tokens, controlled_scores):
    """The candidate stream comes from ``seed``: same seed, same candidates; another seed, others."""
    for seed in (5, 5, 6):
        SelectedWindows(base_batches(tokens), object(), selected_batches=2, world=World(), seed=seed)
    first, again, other = controlled_scores
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_selected_batches_come_from_the_kept_starts_then_from_the_base(tokens, controlled_scores):
    """Micro-batch i < selected_batches: windows of the i-th group of kept starts; from then on: base.batch(i)."""
    base = base_batches(tokens)
    selected = SelectedWindows(base, object(), selected_batches=3, world=World(), keep_fraction=0.5)
    for index in range(3):
        inputs, targets = selected(index)
        group = selected.starts[index * BATCH:(index + 1) * BATCH]
        expected_inputs, expected_targets = windows_to_tensors(tokens, group, SEQ)
        assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)
        np.testing.assert_array_equal(inputs[:, 0].numpy(), tokens[group])
    for index in (3, 4, 17):
        assert all(torch.equal(a, b) for a, b in zip(selected.batch(index), base.batch(index), strict=True))


def test_saved_starts_reproduce_the_batches_without_a_teacher(tokens, controlled_scores):
    """``starts=`` gives identical batches, scores nothing; starts of the wrong length raise ValueError."""
    base = base_batches(tokens)
    selected = SelectedWindows(base, object(), selected_batches=2, world=World())
    resumed = SelectedWindows(base, None, selected_batches=2, world=World(), starts=selected.starts.tolist())
    assert len(controlled_scores) == 1
    for index in range(4):
        assert all(torch.equal(a, b) for a, b in zip(selected(index), resumed(index), strict=True))
    with pytest.raises(ValueError, match="saved starts"):
        SelectedWindows(base, None, selected_batches=3, world=World(), starts=selected.starts)
    with pytest.raises(ValueError, match="teacher"):
        SelectedWindows(base, None, selected_batches=2, world=World())


@pytest.mark.parametrize("changes", [dict(keep_fraction=0.0), dict(keep_fraction=-0.5), dict(keep_fraction=1.5),
                                     dict(selected_batches=0)])
def test_selected_windows_rejects_bad_settings(tokens, controlled_scores, changes):
    """keep_fraction ∉ (0, 1] and selected_batches ≤ 0 raise ConfigError."""
    with pytest.raises(ConfigError):
        SelectedWindows(base_batches(tokens), object(), **{"selected_batches": 2, "world": World(), **changes})


def record_scored_starts(monkeypatch) -> list[np.ndarray]:
    """The starts each call of ``score_windows`` scores (appended to the returned list), the scoring unchanged."""
    asked, real = [], distill.score_windows

    def recording(teacher, tokens, starts, *args, **kwargs):
        asked.append(np.array(starts))
        return real(teacher, tokens, starts, *args, **kwargs)

    monkeypatch.setattr(distill, "score_windows", recording)
    return asked


def test_selection_with_a_real_teacher_keeps_its_highest_scores(tokens, monkeypatch):
    """Unpatched scoring with a small LM teacher: the kept starts are the top half of the candidates by
    score_windows, and their scores beat the rest's."""
    teacher, real = tiny_lm(9), distill.score_windows
    asked = record_scored_starts(monkeypatch)
    selected = SelectedWindows(base_batches(tokens), teacher, selected_batches=2, world=World(), keep_fraction=0.5,
                               top_k=3, score_batch_size=5)
    [candidates] = asked
    scores = real(teacher, tokens, candidates, SEQ, 64, top_k=3)
    np.testing.assert_array_equal(selected.starts, expected_selection(candidates, scores, 8))


def test_two_ranks_agree_on_the_selection_and_split_each_batch(tokens, monkeypatch):
    """World of 2 (all_gather stand-in): each rank scores its share of the candidates, both keep the starts one
    process keeps, and their batches concatenated in rank order are the one-process batch."""
    teacher, real = tiny_lm(10), distill.score_windows
    asked = record_scored_starts(monkeypatch)
    base = base_batches(tokens)
    single = SelectedWindows(base, teacher, selected_batches=3, world=World(), keep_fraction=0.5, top_k=4)
    [candidates] = asked
    parts = [real(teacher, tokens, candidates[rank::2], SEQ, BATCH, top_k=4) for rank in range(2)]

    def ranks(rank: int) -> SelectedWindows:
        def gather(mine):
            np.testing.assert_array_equal(mine, parts[rank])  # this rank scored its own share
            return parts

        monkeypatch.setattr(distill, "all_gather_objects", gather)
        return SelectedWindows(base, teacher, selected_batches=3, world=World(rank=rank, world_size=2),
                               keep_fraction=0.5, top_k=4)

    first, second = ranks(0), ranks(1)
    np.testing.assert_array_equal(asked[1], candidates[0::2])
    np.testing.assert_array_equal(asked[2], candidates[1::2])
    np.testing.assert_array_equal(first.starts, single.starts)
    np.testing.assert_array_equal(second.starts, single.starts)
    for index in (0, 2, 3, 6):
        for whole, a, b in zip(single(index), first(index), second(index), strict=True):
            assert a.shape == (BATCH // 2, SEQ)
            assert torch.equal(torch.cat([a, b]), whole)


# -- resume ------------------------------------------------------------------------------------------------------------
def salt_ds_trainer(run_dir, tokens: np.ndarray, starts: np.ndarray | None, callbacks=()) -> Trainer:
    """SALT_DS on a tiny LM: 8 steps, distillation (and selected windows) for the first 4, a checkpoint every 2."""
    teacher = tiny_lm(11, d_model=16)
    windows = SelectedWindows(base_batches(tokens), None if starts is not None else teacher, 4, World(), seed=5,
                              starts=starts)
    config = TrainConfig(steps=8, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2)
    return Trainer(tiny_lm(12), DistillationLoss(teacher, KDSchedule(0.5, kd_steps=4)), windows, config,
                   run_dir=run_dir, quiet=True, callbacks=list(callbacks))


@pytest.mark.parametrize("interrupt_after", [1, 4])  # stopped inside the distillation stage, or after it
def test_an_interrupted_salt_ds_run_resumes_bit_identically(tmp_path, tokens, interrupt_at, interrupt_after):
    """Resumed with the kept starts saved before training (no scoring again), the run equals an uninterrupted one:
    the loss is stateless apart from the step, and the batches are a function of the micro-batch index."""
    straight = salt_ds_trainer(tmp_path / "straight", tokens, None)
    reference = straight.fit()
    first = salt_ds_trainer(tmp_path / "split", tokens, None, [interrupt_at(interrupt_after)])
    with pytest.raises(TrainingInterrupted):
        first.fit()
    resumed = salt_ds_trainer(tmp_path / "split", tokens, first.batches.starts)
    resumed.resume = True
    result = resumed.fit()
    for name in ("train_loss", "kd_weight", "kd", "ce"):
        assert result.curves[name] == reference.curves[name], name
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)



# -- Hugging Face models -----------------------------------------------------------------------------------------------
def tiny_llama(seed: int, hidden: int, layers: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


def test_salt_trains_a_hugging_face_student_from_a_hugging_face_teacher(tmp_path, tokens):
    """The user's own HF causal LMs, unwrapped: the stage distils (kd > 0), then trains plainly; SALT_DS scores
    windows with the HF teacher as with an effml LM."""
    student, teacher = tiny_llama(0, hidden=32, layers=2), tiny_llama(1, hidden=16, layers=1)
    windows = SelectedWindows(base_batches(tokens), teacher, 2, World(), seed=0)
    config = TrainConfig(steps=4, lr=3e-3, warmup_steps=1, log_every=1)
    result = Trainer(student, DistillationLoss(teacher, KDSchedule(0.5, kd_steps=2)), windows, config,
                     run_dir=tmp_path, quiet=True).fit()
    kd = [value for _, value in result.curves["kd"]]
    assert kd[0] > 0 and kd[1] > 0 and kd[2:] == [0.0, 0.0]
    assert all(math.isfinite(loss) for _, loss in result.curves["train_loss"])
