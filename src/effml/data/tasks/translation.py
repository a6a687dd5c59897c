"""A synthetic "translation" task with two valid outputs per input: the test bed of non-autoregressive decoding.

Built for generative masked language models / PaDIR (Li et al., "Promises and pitfalls of generative masked language
modeling: theoretical framework and practical guidelines", arXiv 2407.21046), which decode a whole target in parallel
with a few refinement passes and are compared with an autoregressive encoder-decoder. Parallel decoding predicts the
target positions (nearly) independently, so when the target distribution has several modes it can mix them: this
task has exactly two modes per source, which must not be mixed.

One vocabulary serves source and target: ids ``0 … 4`` are PAD, BOS, EOS, MASK and LENGTH (the last two for the
masked / length-predicting decoder); then ``n_symbols`` source symbols; then ``n_symbols + m · n_ambiguous`` target
tokens (m = ``second_spelling_tokens``). A source is ``L ~ U{min_length … max_length}`` symbols drawn uniformly.
Its target ("translation") is the source **reversed**, each symbol spelt through a fixed random map drawn from
``map_seed``:

* an unambiguous symbol has one spelling, a single target token;
* each of ``n_ambiguous`` symbols (chosen by ``map_seed``) has two equally valid spellings: a **short** one (one target
  token) and a **long** one (``second_spelling_tokens`` = m target tokens, found in no other spelling; with m = 1 the
  "long" spelling is another single token, so both dialects have the same length).

Every symbol's one-token spelling is a different token, so the map is invertible. Per example a **dialect**
``d ~ Bernoulli(1/2)`` picks the spelling of *all* ambiguous symbols (0: short, 1: long); a source with ``k`` ambiguous
symbols therefore has exactly two valid targets, of lengths differing by ``(m − 1)·k``, when ``k ≥ 1`` and one
otherwise. With m = 2 the target's length reveals its dialect, so a model that predicts the length first (PaDIR)
has chosen the dialect with it; with m = 1 only the tokens do, and a decoder that predicts positions independently
must keep them consistent across the whole target.
An output that spells some ambiguous symbols short and others long is wrong.

The data drawn from a seed do not depend on ``map_seed``, so two tasks differing only in the map give paired sources.
Evaluation (:meth:`SyntheticTranslation.evaluate`) scores whole decoded sequences: exact match against either valid
target, corpus BLEU with both valid targets as references (:func:`effml.metrics.corpus_bleu`), length accuracy, and
the rate of repeated adjacent tokens (the "stutter" of parallel decoding) with the same rate of the data for context.
"""

from __future__ import annotations

import functools
import operator
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from effml.data.tasks.base import Task, check_int_param, evaluation_batches, register_task
from effml.metrics.bleu import BleuStatistics, bleu_from_statistics, corpus_bleu_statistics, repeat_counts

__all__ = ["SyntheticTranslation", "TranslationBatch"]


@dataclass
class TranslationBatch:
    """A batch of ``B`` source sequences with their two dialects' targets (no BOS/EOS: a model adds its own).

    Attributes:
        sources: int64 ``(B, max_length)`` source ids, PAD after ``source_lengths[b]``. source_lengths: int64 ``(B,)``.
        targets: int64 ``(B, max_target_length)`` the sampled dialect's target, PAD-padded. target_lengths: ``(B,)``.
        dialects: bool ``(B,)``, True where the sampled dialect is the long one.
        alternatives: int64 ``(B, max_target_length)`` the other dialect's target (equal to ``targets`` when the
            source has no ambiguous symbol), PAD-padded. alternative_lengths: int64 ``(B,)``.
    """

    sources: torch.Tensor
    source_lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    dialects: torch.Tensor
    alternatives: torch.Tensor
    alternative_lengths: torch.Tensor

    def to(self, device: torch.device | str) -> TranslationBatch:
        """The same batch on ``device``."""
        return TranslationBatch(**{name: value.to(device) for name, value in vars(self).items()})

    def __len__(self) -> int:
        return int(self.sources.shape[0])

    def valid_targets(self) -> list[list[list[int]]]:
        """Per example, its distinct valid targets as id lists: the sampled target, then the alternative if it
        differs (``B`` lists of 1 or 2 targets; the references of BLEU)."""
        examples = []
        for target, length, alternative, alternative_length in zip(
                self.targets.tolist(), self.target_lengths.tolist(), self.alternatives.tolist(),
                self.alternative_lengths.tolist(), strict=True):
            valid = [target[:length]]
            if alternative[:alternative_length] != valid[0]:
                valid.append(alternative[:alternative_length])
            examples.append(valid)
        return examples


def _id_list(sequence: Any, what: str) -> list[int]:
    """``sequence`` (list, tuple, 1-D tensor or array of integer ids) as a list of ints, validated."""
    try:
        ids = torch.as_tensor(sequence)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{what} is not a sequence of token ids ({error}); pass a list or 1-D tensor of ints.") \
            from error
    if ids.dim() != 1 or (ids.numel() > 0 and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)):
        raise ValueError(f"{what} must be a 1-D sequence of integer token ids, got a {ids.dtype} tensor of shape "
                         f"{tuple(ids.shape)}; pass one list or 1-D int tensor per example, without padding (e.g. "
                         "ids[:length].tolist()).")
    return [int(token) for token in ids.tolist()]


class TranslationTask(Task):
    """What translation tasks share: the special ids, and whole-sequence scoring of decoded targets.

    One vocabulary serves source and target; ids ``0 … 4`` are PAD, BOS, EOS, MASK and LENGTH. A subclass defines
    ``vocab_size``, ``target_offset`` (the first target id), ``max_target_length``, :meth:`sample` and
    :meth:`evaluation_examples` (the batches scored), and may override :meth:`bleu_tokens`. A task whose training
    pairs are a finite set (``finite_training_set``) also defines ``training_size``, ``sample_indices(batch_size,
    seed)`` (the pairs ``sample`` draws) and ``training_batch(indices)``.
    """

    finite_training_set: ClassVar[bool] = False  # True: a fixed set of pairs, not generated without end

    pad_id: ClassVar[int] = 0
    bos_id: ClassVar[int] = 1
    eos_id: ClassVar[int] = 2
    mask_id: ClassVar[int] = 3
    length_id: ClassVar[int] = 4
    n_special: ClassVar[int] = 5

    @abstractmethod
    def evaluation_examples(self, n: int, seed: int, batch_size: int, rank: int = 0,
                            world_size: int = 1) -> Iterator[TranslationBatch]:
        """The batches of the ``n`` evaluation examples from ``seed`` that rank ``rank`` of ``world_size`` scores."""

    def bleu_tokens(self, ids: list[int]) -> Sequence[Hashable]:
        """The units BLEU counts in a target of ``ids``: the ids themselves (a subclass may detokenize)."""
        return ids

    # -- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, predict: Callable[[TranslationBatch], Any], n: int, seed: int,
                 batch_size: int = 64) -> dict[str, float]:
        """Whole-sequence scores of ``predict`` on ``n`` examples.

        Args:
            predict: maps a :class:`TranslationBatch` (on CPU) of ``B`` examples to ``B`` predicted targets, each a
                list or 1-D tensor of target ids without PAD/BOS/EOS.
            n: number of examples (a task with a fixed held-out set scores at most the examples it has); seed:
                evaluation seed; batch_size: examples per ``predict`` call.

        Returns:
            ``exact_match``: fraction of outputs equal to a valid target; ``bleu``: corpus BLEU (0–100, sacrebleu's
            defaults: BLEU-4, 'exp' smoothing) over :meth:`bleu_tokens`, with every valid target as a reference;
            ``length_accuracy``: fraction
            of outputs as long as a valid target; ``repeat_rate``: repeated adjacent tokens of the outputs;
            ``reference_repeat_rate``: the same of the sampled targets.
        """
        return self.metrics_from_sums([self.evaluation_sums(predict, n, seed, batch_size)], n)

    @torch.no_grad()
    def evaluation_sums(self, predict: Callable[[TranslationBatch], Any], n: int, seed: int, batch_size: int = 64,
                        rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """The additive statistics behind :meth:`evaluate` over this rank's share of the ``n`` examples (see
        :meth:`evaluation_examples`): ``examples`` scored, ``exact_matches``, ``length_matches``, ``bleu``
        (:class:`BleuStatistics`; None for a rank left without a batch), ``repeats``/``pairs`` of the outputs, and
        ``reference_repeats``/``reference_pairs`` of the sampled targets."""
        sums: dict[str, Any] = dict.fromkeys(("examples", "exact_matches", "length_matches", "repeats", "pairs",
                                              "reference_repeats", "reference_pairs"), 0)
        sums["bleu"] = None
        for batch in self.evaluation_examples(n, seed, batch_size, rank, world_size):
            size = len(batch)
            outputs = predict(batch)
            count = len(outputs) if hasattr(outputs, "__len__") and not isinstance(outputs, str) else None
            if count != size:
                raise ValueError(f"predict must return one predicted target per example ({size} for this batch), got "
                                 f"{type(outputs).__name__ if count is None else count}; return a list of {size} id "
                                 "lists or 1-D tensors (PAD/BOS/EOS stripped).")
            outputs = [_id_list(output, f"predict's output {index}") for index, output in enumerate(outputs)]
            valid = batch.valid_targets()
            sums["examples"] += size
            sums["exact_matches"] += sum(output in targets for output, targets in zip(outputs, valid, strict=True))
            sums["length_matches"] += sum(len(output) in {len(target) for target in targets}
                                          for output, targets in zip(outputs, valid, strict=True))
            statistics = corpus_bleu_statistics([self.bleu_tokens(output) for output in outputs],
                                                [[self.bleu_tokens(target) for target in targets] for targets in valid])
            sums["bleu"] = statistics if sums["bleu"] is None else sums["bleu"] + statistics
            for prefix, sequences in (("", outputs), ("reference_", [targets[0] for targets in valid])):
                repeats, pairs = repeat_counts(sequences)
                sums[f"{prefix}repeats"] += repeats
                sums[f"{prefix}pairs"] += pairs
        return sums

    def metrics_from_sums(self, sums: list[dict[str, Any]], n: int) -> dict[str, float]:
        """:meth:`evaluate`'s metrics from every rank's :meth:`evaluation_sums` of the same ``n`` examples (rates
        are over the examples the ranks scored together, which a fixed held-out set may hold fewer of than ``n``:
        ``n`` is not read)."""
        total = {key: sum(rank_sums[key] for rank_sums in sums) for key in sums[0] if key != "bleu"}
        bleu: BleuStatistics = functools.reduce(operator.add, [rank_sums["bleu"] for rank_sums in sums
                                                               if rank_sums["bleu"] is not None])

        def rate(prefix: str) -> float:
            return total[f"{prefix}repeats"] / total[f"{prefix}pairs"] if total[f"{prefix}pairs"] else 0.0

        return {"exact_match": total["exact_matches"] / total["examples"], "bleu": bleu_from_statistics(bleu).score,
                "length_accuracy": total["length_matches"] / total["examples"], "repeat_rate": rate(""),
                "reference_repeat_rate": rate("reference_")}


@register_task
@dataclass(frozen=True)
class SyntheticTranslation(TranslationTask):
    """Reverse a symbol string and spell it in one of two dialects; see the module docstring.

    ``vocab_size = 5 + 2 · n_symbols + m · n_ambiguous`` (m = ``second_spelling_tokens``); sources have at most
    ``max_length`` symbols and targets at most ``max_target_length`` tokens.
    """

    name: ClassVar[str] = "synthetic-translation"

    n_symbols: int = 32
    n_ambiguous: int = 8
    min_length: int = 8
    max_length: int = 24
    map_seed: int = 0
    second_spelling_tokens: int = 2

    def __post_init__(self) -> None:
        check_int_param(self.name, "n_symbols", self.n_symbols)
        check_int_param(self.name, "n_ambiguous", self.n_ambiguous, minimum=0)
        check_int_param(self.name, "min_length", self.min_length)
        check_int_param(self.name, "max_length", self.max_length)
        check_int_param(self.name, "map_seed", self.map_seed, minimum=0)
        if self.second_spelling_tokens not in (1, 2):
            raise ValueError(f"Task {self.name!r}: second_spelling_tokens must be 1 (both dialects the same length) or "
                             f"2 (the long dialect longer), got {self.second_spelling_tokens!r}.")
        if self.n_ambiguous > self.n_symbols:
            raise ValueError(f"Task {self.name!r}: n_ambiguous={self.n_ambiguous} exceeds n_symbols={self.n_symbols}; "
                             "the ambiguous symbols are a subset of the source symbols, so n_ambiguous must be at "
                             "most n_symbols.")
        if self.min_length > self.max_length:
            raise ValueError(f"Task {self.name!r}: min_length={self.min_length} exceeds max_length="
                             f"{self.max_length}; source lengths are drawn from [min_length, max_length].")

    # -- vocabulary ------------------------------------------------------------------------------------------------

    @property
    def source_offset(self) -> int:
        """Id of source symbol 0 (source ids are ``source_offset … source_offset + n_symbols - 1``)."""
        return self.n_special

    @property
    def target_offset(self) -> int:
        """Id of the first target token (target ids are ``target_offset … vocab_size - 1``)."""
        return self.n_special + self.n_symbols

    @property
    def vocab_size(self) -> int:
        """Number of ids: specials, source symbols and ``n_symbols + m · n_ambiguous`` target tokens."""
        return self.target_offset + self.n_symbols + self.second_spelling_tokens * self.n_ambiguous

    @property
    def max_target_length(self) -> int:
        """The longest possible target: ``m · max_length`` with ambiguous symbols (all spelt long), else
        ``max_length``."""
        return self.second_spelling_tokens * self.max_length if self.n_ambiguous > 0 else self.max_length

    @functools.cached_property
    def _spellings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The map from ``map_seed``: spelt tokens int64 ``(2, n_symbols, 2)`` (dialect, symbol, piece; PAD after
        a one-token spelling), spelling lengths int64 ``(2, n_symbols)`` and the ambiguous symbols' indices."""
        rng = np.random.default_rng(self.map_seed)
        second = self.second_spelling_tokens
        tokens = self.target_offset + rng.permutation(self.n_symbols + second * self.n_ambiguous)
        ambiguous = np.sort(rng.choice(self.n_symbols, size=self.n_ambiguous, replace=False))
        spelt = np.full((2, self.n_symbols, 2), self.pad_id, dtype=np.int64)
        spelt[:, :, 0] = tokens[:self.n_symbols]  # every symbol's one-token spelling, a different token each
        spelt[1, ambiguous, :second] = tokens[self.n_symbols:].reshape(self.n_ambiguous, second)  # fresh tokens
        lengths = np.ones((2, self.n_symbols), dtype=np.int64)
        lengths[1, ambiguous] = second
        return spelt, lengths, ambiguous

    @property
    def ambiguous_symbols(self) -> tuple[int, ...]:
        """Source ids of the ``n_ambiguous`` symbols with two spellings, ascending."""
        return tuple(int(index) + self.source_offset for index in self._spellings[2])

    def _spell(self, symbols: np.ndarray, lengths: np.ndarray, dialects: np.ndarray,
               width: int) -> tuple[np.ndarray, np.ndarray]:
        """Targets of source symbol indices ``(B, S)`` (0-based; the first ``lengths[b]`` count) in ``dialects``
        ``(B,)`` (0/1): PAD-padded int64 ``(B, width)`` and their lengths ``(B,)``."""
        batch, source_width = symbols.shape
        spelt, spelling_lengths, _ = self._spellings
        read = lengths[:, None] - 1 - np.arange(source_width)  # target step i spells source position L - 1 - i
        reversed_symbols = np.take_along_axis(symbols, np.maximum(read, 0), axis=1)
        pieces = spelt[dialects[:, None], reversed_symbols].reshape(batch, 2 * source_width)
        piece_counts = np.where(read >= 0, spelling_lengths[dialects[:, None], reversed_symbols], 0)
        keep = (np.arange(2) < piece_counts[..., None]).reshape(batch, 2 * source_width)
        columns = np.cumsum(keep, axis=1) - 1
        rows = np.broadcast_to(np.arange(batch)[:, None], keep.shape)
        targets = np.full((batch, width), self.pad_id, dtype=np.int64)
        targets[rows[keep], columns[keep]] = pieces[keep]
        return targets, keep.sum(axis=1)

    def _symbol_indices(self, source: Any) -> np.ndarray:
        """A source (sequence or 1-D tensor of source ids, no PAD) as 0-based symbol indices ``(L,)``, validated."""
        ids = _id_list(source, "A source")
        indices = np.array(ids, dtype=np.int64) - self.source_offset
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_symbols):
            raise ValueError(f"A source may only hold source ids {self.source_offset} … "
                             f"{self.source_offset + self.n_symbols - 1}, got {ids}; strip PAD and pass ids "
                             "(symbol s has id source_offset + s), not 0-based symbols.")
        return indices

    def translate(self, source: Any, dialect: int | bool) -> list[int]:
        """The target ids of one ``source`` (list or 1-D tensor of ``L`` source ids) in ``dialect`` (0/False: short
        spellings, 1/True: long)."""
        if dialect not in (0, 1):
            raise ValueError(f"dialect must be 0 (short spellings) or 1 (long spellings), got {dialect!r}.")
        indices = self._symbol_indices(source)
        targets, lengths = self._spell(indices[None], np.array([indices.size]), np.array([int(dialect)]),
                                       2 * indices.size)
        return targets[0, :lengths[0]].tolist()

    def references(self, source: Any) -> list[list[int]]:
        """The distinct valid targets of one ``source``: ``[short]`` without ambiguous symbols, else
        ``[short, long]``."""
        short, long = self.translate(source, 0), self.translate(source, 1)
        return [short] if short == long else [short, long]

    # -- sampling --------------------------------------------------------------------------------------------------

    def sample(self, batch_size: int, seed: int) -> TranslationBatch:
        """``batch_size`` examples drawn with ``numpy.random.default_rng(seed)`` (lengths, symbols, dialects)."""
        check_int_param(self.name, "batch_size", batch_size)
        check_int_param(self.name, "seed", seed, minimum=0)
        rng = np.random.default_rng(int(seed))
        lengths = rng.integers(self.min_length, self.max_length + 1, size=batch_size)
        symbols = rng.integers(0, self.n_symbols, size=(batch_size, self.max_length))
        dialects = rng.integers(0, 2, size=batch_size)
        inside = np.arange(self.max_length) < lengths[:, None]
        targets, target_lengths = self._spell(symbols, lengths, dialects, self.max_target_length)
        alternatives, alternative_lengths = self._spell(symbols, lengths, 1 - dialects, self.max_target_length)
        return TranslationBatch(
            sources=torch.from_numpy(np.where(inside, symbols + self.source_offset, self.pad_id)),
            source_lengths=torch.from_numpy(lengths.astype(np.int64)),
            targets=torch.from_numpy(targets), target_lengths=torch.from_numpy(target_lengths.astype(np.int64)),
            dialects=torch.from_numpy(dialects.astype(bool)), alternatives=torch.from_numpy(alternatives),
            alternative_lengths=torch.from_numpy(alternative_lengths.astype(np.int64)))

    def evaluation_examples(self, n: int, seed: int, batch_size: int, rank: int = 0,
                            world_size: int = 1) -> Iterator[TranslationBatch]:
        """This rank's batches of ``n`` fresh examples from ``seed`` (:func:`evaluation_batches`'s sizes and seeds)."""
        for size, batch_seed in evaluation_batches(n, seed, batch_size, rank, world_size):
            yield self.sample(size, batch_seed)
