"""Parallel decoding by iterative refinement (PaDIR) of an ``EncoderDecoder`` with a non-causal decoder.

Li et al., "Promises and pitfalls of generative masked language modeling" (ICML 2024, arXiv 2407.21046), after
Mask-Predict (Ghazvininejad et al., arXiv 1904.09324):

1. Length: the encoder's length predictor proposes the ``length_candidates`` most likely target lengths L ≥ 1 (or
   the caller gives the lengths).
2. Initialise each target of length L with [MASK] everywhere (``init="mask"``) or with tokens drawn uniformly from
   ``replacement_ids`` (``init="random"``, PaDIR's default).
3. Run N parallel passes. Each pass predicts every position at once (argmax, with its log-probability as the
   confidence). Between passes a *rejecter* chooses positions to reset to their initial token for the next pass;
   the others carry the current prediction:
   - ``"none"``: pass-through, the next pass sees every prediction;
   - ``"linear"``: Mask-Predict's schedule, the ⌊L · (N − t − 1) / N⌋ least confident positions after pass t
     (0-based), so later passes reset fewer;
   - ``"stutter"``: every position that repeats its left neighbour's token (the "stutter" a product of independent
     per-position predictions makes, PaDIR §3);
   - ``"linear+stutter"`` (any ``+``-joined names): the union.
4. The output is the last pass's prediction; with several length candidates, each source keeps the candidate with
   the highest mean log-probability of its tokens.

Not implemented from PaDIR's code: the learned rejecter, "range mask" sentinels ([MASK_i]), replacements taken
from previous tokens or summed logits (reset positions always get their initial token here), and stutter re-masking
after the last pass (which PaDIR's code comments found helpful; here rejecters act only between passes, so at N = 1
every re-masking is the same). Instead, ``drop_repeats=True`` drops the later token of every adjacent repeat from the
output (PaDIR's final re-masking restores the token the last pass was fed, which drops it where that was [MASK]).

``update="all"`` (the default, as in PaDIR) scores each position by the last pass's log-probability of its token. A
position that was not reset was fed its own previous prediction, so its confidence is mostly that of copying it, and
the linear schedule mostly resets positions just predicted from [MASK]. ``update="masked"`` is Mask-Predict's rule:
only positions fed their initial token take the new prediction, and every token keeps the probability it had when it
was predicted from [MASK]. Ranking several length candidates by mean log-probability can prefer wrong lengths: in the
``padir`` recipe's task it did so for about 6 sources in 10 already after one pass, under either rule, although the
predictor's most likely length was always the true one. The model never sees a canvas of the wrong length in training
and is overconfident on one: its decodes at wrong lengths, longer and shorter alike, scored a higher mean
log-probability than at the true length (−0.020 vs −0.066 nats per token after 4 passes). That recipe therefore
decodes the predicted length alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from effml.decode.seq2seq import DecodedTargets, check_special_id, within_lengths
from effml.nn.encoder_decoder import EncoderDecoder, Memory

__all__ = ["Rejecter", "PassThrough", "LinearSchedule", "StutterRemasking", "UnionRejecter", "REJECTERS",
           "build_rejecter", "refine_decode", "stutter_positions", "INITS", "UPDATES"]

INITS = ("mask", "random")
UPDATES = ("all", "masked")


class Rejecter(ABC):
    """Chooses, after a pass, the positions whose token is reset to its initial value for the next pass."""

    name: str

    @abstractmethod
    def select(self, tokens: Tensor, confidence: Tensor, valid: Tensor, iteration: int, iterations: int) -> Tensor:
        """Positions to reset.

        Args:
            tokens: (B, T) the pass's predictions; confidence: (B, T) their log-probabilities; valid: (B, T) bool,
                True inside each row's length; iteration: the pass just run (0-based); iterations: N.

        Returns:
            (B, T) bool, never True outside ``valid``.
        """


class PassThrough(Rejecter):
    """Reset nothing: every pass refines all of the previous pass's predictions."""

    name = "none"

    def select(self, tokens: Tensor, confidence: Tensor, valid: Tensor, iteration: int, iterations: int) -> Tensor:
        return torch.zeros_like(valid)


class LinearSchedule(Rejecter):
    """Mask-Predict's linear schedule: reset the ⌊L · (N − t − 1) / N⌋ least confident positions of each row."""

    name = "linear"

    def select(self, tokens: Tensor, confidence: Tensor, valid: Tensor, iteration: int, iterations: int) -> Tensor:
        lengths = valid.sum(dim=1)
        counts = lengths * (iterations - iteration - 1) // iterations  # (B,)
        ordered = confidence.masked_fill(~valid, float("inf")).argsort(dim=1, stable=True)
        ranks = torch.empty_like(ordered)
        ranks.scatter_(1, ordered, torch.arange(ordered.shape[1], device=ordered.device).expand_as(ordered))
        return (ranks < counts[:, None]) & valid


class StutterRemasking(Rejecter):
    """Reset every position whose token equals its left neighbour's (the later of each repeated pair)."""

    name = "stutter"

    def select(self, tokens: Tensor, confidence: Tensor, valid: Tensor, iteration: int, iterations: int) -> Tensor:
        return stutter_positions(tokens, valid)


def stutter_positions(tokens: Tensor, valid: Tensor) -> Tensor:
    """(B, T) bool: the positions inside ``valid`` (B, T) whose token in ``tokens`` (B, T) equals its left
    neighbour's (the later of each repeated pair; the first position never)."""
    repeats = torch.zeros_like(valid)
    repeats[:, 1:] = tokens[:, 1:].eq(tokens[:, :-1]) & valid[:, 1:]
    return repeats


class UnionRejecter(Rejecter):
    """Reset a position when any of ``parts`` would."""

    def __init__(self, parts: Sequence[Rejecter]) -> None:
        self.parts = list(parts)
        self.name = "+".join(part.name for part in self.parts)

    def select(self, tokens: Tensor, confidence: Tensor, valid: Tensor, iteration: int, iterations: int) -> Tensor:
        chosen = torch.zeros_like(valid)
        for part in self.parts:
            chosen |= part.select(tokens, confidence, valid, iteration, iterations)
        return chosen


#: Rejecters by name; ``build_rejecter`` also accepts ``+``-joined names.
REJECTERS: dict[str, type[Rejecter]] = {cls.name: cls for cls in (PassThrough, LinearSchedule, StutterRemasking)}


def build_rejecter(name: str | Rejecter) -> Rejecter:
    """The rejecter called ``name`` ("none", "linear", "stutter", or several joined by "+"), or ``name`` itself."""
    if isinstance(name, Rejecter):
        return name
    parts = name.split("+") if isinstance(name, str) else [name]
    unknown = [part for part in parts if part not in REJECTERS]
    if unknown or not parts:
        raise ValueError(f"unknown remasking {name!r}; choose one of {sorted(REJECTERS)} or several joined by '+' "
                         "(e.g. 'linear+stutter').")
    rejecters = [REJECTERS[part]() for part in parts]
    return rejecters[0] if len(rejecters) == 1 else UnionRejecter(rejecters)


def _length_candidates(memory: Memory, count: int, max_len: int) -> Tensor:
    """(B, count) the most likely target lengths in [1, max_len], most likely first."""
    if memory.length_logits is None:
        raise ValueError("the model has no length predictor (EncoderDecoderConfig.length_classes = 0); build it with "
                         "length_classes > the longest target, or pass the target lengths (lengths=...).")
    logits = memory.length_logits[:, :max_len + 1].clone()
    logits[:, 0] = float("-inf")  # an empty target is never proposed
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= logits.shape[1] - 1:
        raise ValueError(f"length_candidates must be an int in [1, {logits.shape[1] - 1}] (the lengths the predictor "
                         f"can propose), got {count!r}.")
    return logits.topk(count, dim=1).indices


def _expand_memory(memory: Memory, copies: int) -> Memory:
    """The memory with each row repeated ``copies`` times in a row (row b becomes rows b·copies … b·copies+copies−1),
    its cross-attention keys/values too when it carries them."""
    def repeat(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.repeat_interleave(copies, dim=0)
    keys_values = None if memory.cross_keys_values is None else \
        [(repeat(k), repeat(v)) for k, v in memory.cross_keys_values]
    return Memory(repeat(memory.states), repeat(memory.padding), repeat(memory.length_logits), keys_values)


def _without_repeats(tokens: Tensor, lengths: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """``tokens`` (B, T) of ``lengths`` (B,) with the later token of every adjacent repeat dropped, the rest moved
    left in order: (B, T') padded with ``pad_id``, T' the longest new length, and the (B,) new lengths."""
    valid = within_lengths(lengths, tokens.shape[1])
    kept = valid & ~stutter_positions(tokens, valid)
    order = (~kept).to(torch.int8).argsort(dim=1, stable=True)  # kept positions first, in their order
    new_lengths = kept.sum(dim=1)
    width = int(new_lengths.max()) if len(new_lengths) else 0
    moved = tokens.gather(1, order)[:, :width]
    inside = within_lengths(new_lengths, width)
    return moved.masked_fill(~inside, pad_id), new_lengths


def refine_decode(model: EncoderDecoder, source: Tensor, source_padding: Tensor | None = None, *, iterations: int,
                  mask_id: int, pad_id: int, remasking: str | Rejecter = "linear", init: str = "mask",
                  replacement_ids: Tensor | None = None, length_candidates: int = 1, lengths: Tensor | None = None,
                  suppress_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                  update: str = "all", drop_repeats: bool = False) -> DecodedTargets:
    """Decode every target in ``iterations`` parallel passes (see the module docstring).

    Args:
        model: an ``EncoderDecoder`` with a non-causal decoder (eval mode for the call; its mode is restored).
        source: (B, S) ids; source_padding: (B, S) bool, True at padded positions, or None.
        iterations: N ≥ 1 passes of the decoder.
        mask_id: the [MASK] token (initial value with ``init="mask"``); pad_id: filler beyond each row's length.
        remasking: a rejecter or its name. init: "mask" or "random".
        replacement_ids: 1-D ids that random initial tokens are drawn from (required for ``init="random"``).
        length_candidates: how many predicted lengths to decode per source (the best-scoring one is kept).
        lengths: (B,) target lengths to use instead of the predictor (an oracle, or a user's own predictor); then
            ``length_candidates`` is not used.
        suppress_ids: ids never predicted (e.g. PAD, MASK, BOS, EOS).
        generator: random generator for ``init="random"``, on the source's device.
        update: "all" (PaDIR: every pass re-predicts every position, scored by that pass's confidence) or "masked"
            (Mask-Predict: only the positions fed their initial token take the new prediction; the others keep
            their token and the confidence it had when it was predicted).
        drop_repeats: after the last pass, drop every token equal to its left neighbour's (the output's stutter;
            padir's code re-masks stutter after its last iteration too). The rows get shorter; scores are those of
            the decodes before dropping.

    Returns:
        ``DecodedTargets`` (B, T) padded with ``pad_id``, T the longest chosen length, with each row's score (the
        mean log-probability of its tokens in the last pass).
    """
    config = model.config
    if config.causal_decoder:
        raise ValueError("refine_decode needs a non-causal decoder (EncoderDecoderConfig.causal_decoder=False); a "
                         "causal one decodes token by token (effml.decode.decode_autoregressive).")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}.")
    for name, value in (("mask_id", mask_id), ("pad_id", pad_id), *(("suppress_ids", i) for i in suppress_ids)):
        check_special_id(name, value, config.vocab_size)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}.")
    if init == "random" and (replacement_ids is None or replacement_ids.dim() != 1 or replacement_ids.numel() == 0):
        raise ValueError("init='random' draws the first tokens from replacement_ids: give a non-empty 1-D tensor of "
                         "token ids (e.g. the target vocabulary).")
    rejecter = build_rejecter(remasking)
    batch = source.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            memory = model.encode(source, source_padding)
            if lengths is None:
                candidates = _length_candidates(memory, length_candidates, config.max_target_len)
            else:
                if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.dtype == torch.bool \
                        or not 1 <= int(lengths.min()) <= int(lengths.max()) <= config.max_target_len:
                    raise ValueError(f"lengths must be a ({batch},) integer tensor of target lengths in "
                                     f"[1, max_target_len={config.max_target_len}].")
                candidates = lengths.to(source.device).long()[:, None]
            copies = candidates.shape[1]
            flat_lengths = candidates.reshape(-1)
            # the memory's cross-attention keys/values: once for the N passes, and before the candidates' copies
            memory = model.with_cross_keys_values(memory)
            if copies > 1:
                memory = _expand_memory(memory, copies)
            width = int(flat_lengths.max())
            valid = within_lengths(flat_lengths, width)
            if init == "mask":
                initial = torch.full(valid.shape, mask_id, dtype=torch.long, device=source.device)
            else:
                picks = torch.randint(replacement_ids.numel(), valid.shape, generator=generator,
                                      device=source.device)
                initial = replacement_ids.to(source.device)[picks]
            initial = initial.masked_fill(~valid, pad_id)
            suppress = torch.tensor(sorted(set(suppress_ids)), dtype=torch.long, device=source.device)

            tokens, fed_initial = initial, valid
            predicted = confidence = None
            for iteration in range(iterations):
                logits = model.decode(tokens, memory, target_padding=~valid).float()
                logits[..., suppress] = float("-inf")
                new_confidence, new_predicted = logits.log_softmax(-1).max(-1)
                new_predicted = new_predicted.masked_fill(~valid, pad_id)
                if update == "all" or predicted is None:
                    predicted, confidence = new_predicted, new_confidence
                else:  # Mask-Predict: only the positions fed their initial token take the new prediction
                    predicted = torch.where(fed_initial, new_predicted, predicted)
                    confidence = torch.where(fed_initial, new_confidence, confidence)
                if iteration < iterations - 1:
                    fed_initial = rejecter.select(predicted, confidence, valid, iteration, iterations)
                    tokens = torch.where(fed_initial, initial, predicted)
                else:
                    tokens = predicted

            scores = confidence.masked_fill(~valid, 0.0).sum(1) / flat_lengths
            best = scores.view(batch, copies).argmax(1) + torch.arange(batch, device=source.device) * copies
            chosen_lengths = flat_lengths[best]
            tokens = tokens[best, :int(chosen_lengths.max())]
            if drop_repeats:
                tokens, chosen_lengths = _without_repeats(tokens, chosen_lengths, pad_id)
    finally:
        model.train(was_training)
    return DecodedTargets(tokens.clone(), chosen_lengths.clone(), scores[best].clone())
