"""SALT: a small, already trained LM helps train a larger one (Rawat et al., arXiv 2410.18779).

Two stages. For the first ``kd_steps`` optimizer steps the large model (the student) learns from the data and from
the small model (the teacher) at once; afterwards it trains on the data alone:

    L_t = (1 − ω_t) · CE(y_t, p_S(·|x_<t)) + ω_t · τ² · KL(p_T^τ(·|x_<t) ‖ p_S^τ(·|x_<t))

where p^τ is the softmax of the logits divided by the temperature τ, and ω_t = ω during the distillation stage and 0
after (``KDSchedule``; a linear decay to 0 is the paper's other transition). Soft labels from a weaker teacher cut the
variance of the gradient on the "easy" tokens early, at the price of the teacher's bias, which is why they are dropped
later; distilling for the whole run ("reverse KD") holds the student back toward the weaker teacher.

SALT_DS also lets the teacher choose the distillation stage's data: sequences that are "challenging yet learnable"
(the paper's Eq. 10: the median of the teacher's per-token losses over the tokens whose true next token is among the
teacher's top-k predictions, k = 10). ``SelectedWindows`` scores a pool of candidate windows with the teacher before
training and feeds the distillation stage from the highest-scoring share of it.

What is ours, the paper's exact values being unknown to us (``../shared/PAPERS.md`` §5): ω = 0.5 and τ = 1 as
defaults, and the size of the candidate pool (``keep_fraction``). The teacher here is the final small model, not an
early checkpoint of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effml.config import ConfigError, check_choice, check_positive
from effml.data.batches import WindowBatches, rank_share, windows_to_tensors
from effml.data.tasks.base import derive_seed
from effml.train.distributed import World, all_gather_objects
from effml.train.lm import logits_of

__all__ = ["KDSchedule", "distillation_loss", "DistillationLoss", "learnability_scores", "score_windows",
           "SelectedWindows", "TRANSITIONS", "candidate_count"]

TRANSITIONS = ("step", "linear")


@dataclass(frozen=True)
class KDSchedule:
    """The distillation weight ω_t of each optimizer step.

    Args:
        weight: ω during the distillation stage, in (0, 1]; 1 trains on the teacher's distribution alone.
        kd_steps: length of the distillation stage in optimizer steps; ``None`` distils for the whole run.
        transition: ``"step"``: ω until ``kd_steps``, then 0 (the paper's main variant); ``"linear"``: ω decays
            linearly from ``weight`` at step 0 to 0 at step ``kd_steps``.
    """

    weight: float = 0.5
    kd_steps: int | None = None
    transition: str = "step"

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ConfigError(f"KDSchedule weight = {self.weight!r} is out of range: the distillation weight ω "
                              "must lie in (0, 1] (0 would be plain training; leave the teacher out instead).")
        if self.kd_steps is not None:
            check_positive("KDSchedule", "kd_steps", self.kd_steps)
        check_choice("KDSchedule", "transition", self.transition, TRANSITIONS)

    def weight_at(self, step: int) -> float:
        """ω at optimizer step ``step`` (0-based)."""
        if self.kd_steps is None:
            return self.weight
        if step >= self.kd_steps:
            return 0.0
        if self.transition == "linear":
            return self.weight * (1.0 - step / self.kd_steps)
        return self.weight


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                      kd_weight: float, temperature: float = 1.0,
                      ignore_index: int = -100) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the scored tokens of (1 − ω)·CE(y, p_S) + ω·τ²·KL(p_T^τ ‖ p_S^τ).

    Args:
        student_logits, teacher_logits: (B, T, V) logits (any float dtype; computed in float32). ``teacher_logits``
            may be None when ``kd_weight`` is 0, which is then exactly the mean cross-entropy.
        targets: (B, T) next-token ids; positions equal to ``ignore_index`` are not scored.
        kd_weight: ω in [0, 1].
        temperature: τ > 0; τ² keeps the gradient scale of the KL term independent of τ (Hinton et al., 2015).

    Returns:
        ``(loss, parts)``: the scalar loss with gradient to ``student_logits``, and the detached means ``"ce"`` and
        ``"kd"`` (the KL term, 0.0 without a teacher) over the scored tokens.
    """
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight = {kd_weight!r} is out of range: it must lie in [0, 1].")
    if not temperature > 0.0:
        raise ValueError(f"temperature = {temperature!r} is out of range: it must be > 0.")
    logits = student_logits.float().flatten(0, -2)
    flat_targets = targets.flatten()
    keep = flat_targets != ignore_index
    ce = F.cross_entropy(logits, flat_targets, ignore_index=ignore_index)
    if kd_weight == 0.0:
        return ce, {"ce": ce.item(), "kd": 0.0}
    if teacher_logits is None:
        raise ValueError(f"kd_weight = {kd_weight} needs the teacher's logits; got None.")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"The teacher's logits have shape {tuple(teacher_logits.shape)} but the student's "
                         f"{tuple(student_logits.shape)}: distillation needs the same batch and the same vocabulary "
                         "(the same tokenizer) for both models.")
    teacher_flat = teacher_logits.float().flatten(0, -2)
    if not keep.all():  # (indexing copies the (N, V) logits: only when some positions are ignored)
        logits, teacher_flat = logits[keep], teacher_flat[keep]
    student_log_p = F.log_softmax(logits / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_flat / temperature, dim=-1)
    kl = F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean") * temperature ** 2
    loss = (1.0 - kd_weight) * ce + kd_weight * kl
    return loss, {"ce": ce.item(), "kd": kl.item()}


class DistillationLoss:
    """A ``Trainer`` loss function ``(model, batch, step) -> (loss, metrics)`` for SALT's two stages.

    batch = (inputs (B, T), targets (B, T)); ``model`` and ``teacher`` map inputs to (B, T, V) logits (or to an
    output with ``.logits``, as Hugging Face causal LMs do). The teacher is frozen and runs only while ω_t > 0, so the
    steps after the distillation stage cost what plain training costs. Metrics: ``kd_weight``, ``ce`` and ``kd``.
    """

    def __init__(self, teacher: nn.Module, schedule: KDSchedule, temperature: float = 1.0) -> None:
        check_positive("DistillationLoss", "temperature", temperature)
        self.teacher = teacher.eval().requires_grad_(False)
        self.schedule = schedule
        self.temperature = temperature

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs, targets = batch
        weight = self.schedule.weight_at(step)
        logits = logits_of(model(inputs))
        teacher_logits = None
        if weight > 0.0:
            with torch.no_grad():
                teacher_logits = logits_of(self.teacher(inputs))
        loss, parts = distillation_loss(logits, teacher_logits, targets, weight, self.temperature)
        return loss, {"kd_weight": weight, **parts}


def learnability_scores(teacher_logits: torch.Tensor, targets: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """SALT_DS's score of each sequence (the paper's Eq. 10): high for "challenging yet learnable" sequences.

    For each sequence, the teacher's per-token losses at the positions whose true next token is among the teacher's
    ``top_k`` predictions, then their median (the lower of the two middle values for an even count, as
    ``torch.median``). A sequence with no such position scores −inf (selected last).

    Args:
        teacher_logits: (B, T, V). targets: (B, T) next-token ids.

    Returns:
        (B,) float32 scores.
    """
    check_positive("learnability_scores", "top_k", top_k)
    logits = teacher_logits.float()
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices  # (B, T, k)
    learnable = (top == targets.unsqueeze(-1)).any(dim=-1)  # (B, T)
    # lower median of the learnable positions: sort with the others pushed to the end, take index (count − 1) // 2
    ordered = losses.masked_fill(~learnable, math.inf).sort(dim=-1).values
    count = learnable.sum(dim=-1)
    median = ordered.gather(-1, ((count - 1).clamp_min(0) // 2).unsqueeze(-1)).squeeze(-1)
    scores = torch.where(count > 0, median, torch.full_like(median, -math.inf))
    return scores


@torch.no_grad()
def score_windows(teacher: nn.Module, tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int,
                  top_k: int = 10, device: torch.device | str = "cpu") -> np.ndarray:
    """``learnability_scores`` of the windows of ``seq_len`` tokens at ``starts`` (N,), scored ``batch_size`` at a
    time; returns an (N,) float64 array."""
    teacher.eval()
    scores = []
    for begin in range(0, len(starts), batch_size):
        inputs, targets = windows_to_tensors(tokens, starts[begin:begin + batch_size], seq_len)
        logits = logits_of(teacher(inputs.to(device)))
        scores.append(learnability_scores(logits, targets.to(device), top_k).cpu().numpy())
    return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)


def candidate_count(kept: int, keep_fraction: float) -> int:
    """How many candidate windows SALT_DS scores to keep ``kept`` of them: ⌈kept / keep_fraction⌉."""
    return math.ceil(kept / keep_fraction - 1e-9)  # (21 / 0.7 is 30.000000000000004 in floats)


class SelectedWindows:
    """SALT_DS's batch source ``index -> (inputs, targets)``: the first ``selected_batches`` micro-batches come from
    the windows the teacher scores highest, the later ones from ``base`` unchanged.

    Before training, ``selected_batches · B / keep_fraction`` candidate windows are drawn at random with replacement,
    as the training stream's are (a stream of their own, from ``seed``), and scored with ``learnability_scores``
    (each rank scores a share; the scores are gathered). The top ``keep_fraction`` of them is kept, in the
    candidates' random order (the selection is no curriculum). Micro-batch ``i < selected_batches`` is the i-th
    group of B kept windows (this rank's share of it); micro-batch ``i ≥ selected_batches`` is ``base.batch(i)``, so
    after the distillation stage the student sees exactly the windows a run without selection would.

    ``starts`` (the kept windows' start offsets, (selected_batches · B,) int64) can be saved and passed back in to
    skip the scoring on resume.
    """

    def __init__(self, base: WindowBatches, teacher: nn.Module | None, selected_batches: int, world: World, *,
                 keep_fraction: float = 0.5, top_k: int = 10, seed: int = 0, score_batch_size: int | None = None,
                 device: torch.device | str = "cpu", starts: np.ndarray | None = None) -> None:
        check_positive("SelectedWindows", "selected_batches", selected_batches)
        if not 0.0 < keep_fraction <= 1.0:
            raise ConfigError(f"SelectedWindows keep_fraction = {keep_fraction!r} is out of range: the share of "
                              "candidate windows kept must lie in (0, 1].")
        self.base, self.world, self.selected_batches = base, world, selected_batches
        needed = selected_batches * base.batch_size
        if starts is None:
            if teacher is None:
                raise ValueError("SelectedWindows needs the teacher to score the candidates (or the saved starts).")
            starts = self._select(teacher, needed, keep_fraction, top_k, seed, score_batch_size or base.batch_size,
                                  device)
        starts = np.asarray(starts, dtype=np.int64)
        if starts.shape != (needed,):
            raise ValueError(f"SelectedWindows was given {starts.shape} saved starts; {selected_batches} batches of "
                             f"{base.batch_size} windows need ({needed},). Were they saved by another config?")
        self.starts = starts

    def _select(self, teacher: nn.Module, needed: int, keep_fraction: float, top_k: int, seed: int,
                score_batch_size: int, device: torch.device | str) -> np.ndarray:
        n_candidates = candidate_count(needed, keep_fraction)
        candidates = np.random.default_rng(derive_seed(seed, 0x5A17)).integers(
            0, self.base.n_starts, size=n_candidates, dtype=np.int64)
        rank, world_size = self.world.rank, self.world.world_size
        mine = score_windows(teacher, self.base.tokens, candidates[rank::world_size], self.base.seq_len,
                             score_batch_size, top_k, device)
        scores = np.empty(n_candidates)
        for other, part in enumerate(all_gather_objects(mine)):
            scores[other::world_size] = part
        # the `needed` best, ties broken by position; then back in the candidates' random order
        order = np.lexsort((np.arange(n_candidates), -scores))[:needed]
        return candidates[np.sort(order)]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of micro-batch ``index``: (inputs, targets), each (B / world_size, T) int64."""
        if index >= self.selected_batches:
            return self.base.batch(index, self.world.rank, self.world.world_size)
        size = self.base.batch_size
        starts = rank_share(self.starts[index * size:(index + 1) * size], self.world.rank, self.world.world_size)
        return windows_to_tensors(self.base.tokens, starts, self.base.seq_len)

    __call__ = batch
