"""The generative masked-LM objective of PaDIR: corrupt the target, then learn to restore it in one parallel pass.

Li et al., "Promises and pitfalls of generative masked language modeling" (ICML 2024, arXiv 2407.21046), PaDIR's
training corruption (its ``preprocessors.py`` as PAPERS.md §9 reads it): each example draws a noise density
u ~ U(0, 1) (or uses a fixed ``noise_density``); each target position is noised independently with probability u;
a noised position keeps its token with probability ``keep_prob`` (0.1), becomes a token drawn uniformly from
``replacement_ids`` with probability ``random_prob`` (0.1), and becomes [MASK] otherwise. The non-causal decoder
predicts the whole clean target from the corrupted one; the loss counts every position (``"all"``), only the noised
ones (``"noised"``) or only the [MASK]ed ones (``"masked"``) — PaDIR's ``LossWeightingScheme``. Drawing the density
per example trains the decoder for every stage of iterative refinement, from all-[MASK] to nearly clean.

PaDIR's optional multi-stage training (``num_train_stages`` in its ``models.py``) unrolls the decoder during training
as it runs when decoding: stage 1 restores the corrupted target; each later stage is fed the previous stage's argmax
predictions (``next_stage_inputs``; no gradient flows through the argmax) and is trained to restore the clean target
from them, on every position of the target; the stages' losses add up. The later stages thus see the decoder's own
kind of errors, stutter included, which corruption by [MASK] and random tokens never shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Corruption", "corrupt_targets", "loss_positions", "masked_cross_entropy", "masked_target_loss",
           "next_stage_inputs", "LOSS_WEIGHTINGS"]

LOSS_WEIGHTINGS = ("all", "noised", "masked")


@dataclass
class Corruption:
    """A corrupted target batch.

    Attributes:
        inputs: (B, T) the decoder's input: the target with its noised positions replaced (padding unchanged).
        noised: (B, T) bool, positions chosen for noise (whatever they became).
        masked: (B, T) bool, noised positions that became [MASK].
        density: (B,) the noise density each example drew.
    """

    inputs: Tensor
    noised: Tensor
    masked: Tensor
    density: Tensor


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")


def corrupt_targets(targets: Tensor, padding: Tensor, *, mask_id: int, replacement_ids: Tensor,
                    noise_density: float | None = None, keep_prob: float = 0.1, random_prob: float = 0.1,
                    generator: torch.Generator | None = None) -> Corruption:
    """PaDIR's corruption of a target batch (see the module docstring).

    Args:
        targets: (B, T) int64 clean target ids; padding: (B, T) bool, True at padded positions (never noised).
        mask_id: the [MASK] id. replacement_ids: 1-D ids that random replacements are drawn from.
        noise_density: a fixed noise probability per position, or None to draw u ~ U(0, 1) per example.
        keep_prob, random_prob: the shares of noised positions kept unchanged and replaced by a random id
            (their sum is at most 1; the rest become [MASK]).
        generator: random generator on the targets' device.

    Returns:
        ``Corruption``: the decoder inputs and which positions were noised and masked.
    """
    if noise_density is not None:
        _check_probability("noise_density", noise_density)
    _check_probability("keep_prob", keep_prob)
    _check_probability("random_prob", random_prob)
    if keep_prob + random_prob > 1.0:
        raise ValueError(f"keep_prob + random_prob must be at most 1 (the rest of the noised positions become "
                         f"[MASK]), got {keep_prob} + {random_prob}.")
    if padding.shape != targets.shape or padding.dtype != torch.bool:
        raise ValueError(f"padding must be a bool tensor of the targets' shape {tuple(targets.shape)}.")
    if replacement_ids.dim() != 1 or replacement_ids.numel() == 0:
        raise ValueError("replacement_ids must be a non-empty 1-D tensor of token ids (e.g. the target vocabulary).")
    batch, _ = targets.shape
    device = targets.device

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    if noise_density is None:
        density = uniform(batch)
    else:
        density = torch.full((batch,), float(noise_density), device=device)
    noised = (uniform(*targets.shape) < density[:, None]) & ~padding
    fate = uniform(*targets.shape)  # [0, keep) keep, [keep, keep + random) random, the rest [MASK]
    randomised = noised & (fate >= keep_prob) & (fate < keep_prob + random_prob)
    masked = noised & (fate >= keep_prob + random_prob)
    picks = torch.randint(replacement_ids.numel(), targets.shape, generator=generator, device=device)
    inputs = torch.where(randomised, replacement_ids.to(device)[picks], targets)
    inputs = inputs.masked_fill(masked, mask_id)
    return Corruption(inputs, noised, masked, density)


def loss_positions(padding: Tensor, corruption: Corruption, weighting: str = "all") -> Tensor:
    """The (B, T) bool positions the token loss counts: every non-padded one ("all"), the noised ones ("noised") or
    the [MASK]ed ones ("masked"); ``padding`` (B, T) bool is True beyond each target."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}.")
    return {"all": ~padding, "noised": corruption.noised, "masked": corruption.masked}[weighting]


def masked_cross_entropy(logits: Tensor, targets: Tensor, selected: Tensor) -> Tensor:
    """Mean cross-entropy of ``targets`` (B, T) under ``logits`` (B, T, V) over the ``selected`` (B, T) positions,
    computed in float32; 0 (with a gradient) when nothing is selected, where a plain mean would be NaN."""
    total = F.cross_entropy(logits[selected].float(), targets[selected], reduction="sum")
    return total / selected.sum().clamp_min(1)


def masked_target_loss(logits: Tensor, targets: Tensor, padding: Tensor, corruption: Corruption,
                       weighting: str = "all") -> tuple[Tensor, Tensor]:
    """Cross-entropy of the clean ``targets`` (B, T) under ``logits`` (B, T, V) on the positions ``weighting``
    selects (``loss_positions``).

    Returns:
        (mean loss over the selected positions — 0 with a gradient when none is selected, the (B, T) bool selection).
    """
    selected = loss_positions(padding, corruption, weighting)
    return masked_cross_entropy(logits, targets, selected), selected


def next_stage_inputs(logits: Tensor, inputs: Tensor, valid: Tensor, *, suppress_ids: Sequence[int] = (),
                      remask_stutter: bool = False) -> Tensor:
    """The decoder input of the next stage of PaDIR's multi-stage training (the module docstring): this stage's
    argmax predictions inside each target, its own ``inputs`` elsewhere (padding stays padding).

    Args:
        logits: (B, T, V) this stage's decoder logits (not differentiated through).
        inputs: (B, T) this stage's decoder input. valid: (B, T) bool, True inside each target.
        suppress_ids: ids never predicted (e.g. PAD, MASK, BOS, EOS: what decoding suppresses too).
        remask_stutter: keep this stage's input instead of the prediction wherever the prediction repeats its left
            neighbour's token (PaDIR's ``remask_stutter``).

    Returns:
        (B, T) int64 ids.
    """
    from effml.decode.refinement import stutter_positions

    if logits.shape[:2] != inputs.shape or valid.shape != inputs.shape or valid.dtype != torch.bool:
        raise ValueError(f"logits (B, T, V), inputs (B, T) and valid (B, T, bool) must agree in B and T; got "
                         f"{tuple(logits.shape)}, {tuple(inputs.shape)} and {tuple(valid.shape)} ({valid.dtype}).")
    with torch.no_grad():
        scores = logits.detach()
        if suppress_ids:
            scores = scores.index_fill(-1, torch.tensor(sorted(set(suppress_ids)), device=scores.device),
                                       float("-inf"))
        predicted = torch.where(valid, scores.argmax(-1), inputs)
        if remask_stutter:
            predicted = torch.where(stutter_positions(predicted, valid), inputs, predicted)
    return predicted
