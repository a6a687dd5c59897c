"""Corpus BLEU over token sequences, and the repeated-adjacent-token ("stutter") rate of decoded outputs.

BLEU (Papineni, Roukos, Ward and Zhu, "BLEU: a Method for Automatic Evaluation of Machine Translation", ACL 2002),
computed as sacrebleu computes it (Post, "A Call for Clarity in Reporting BLEU Scores", WMT 2018) on sequences that
are already tokens (ids or strings), so no tokenizer is involved:

* per hypothesis and order ``n = 1 … N``, the **clipped matches**: each hypothesis n-gram counts at most as often as
  it occurs in the reference where it occurs most (the maximum over that hypothesis' references), and the **total**
  number of hypothesis n-grams;
* per hypothesis, the **reference length** is the length of the reference closest to the hypothesis length (ties go
  to the shorter reference);
* these statistics are summed over the corpus (:class:`BleuStatistics` adds, so data-parallel ranks can each sum
  their share), then ``p_n = 100 · matches_n / totals_n``, the brevity penalty ``BP = 1`` if ``c ≥ r`` else
  ``exp(1 − r / c)`` (``0`` when ``c = 0``), with ``c`` and ``r`` the summed hypothesis and reference lengths, and

      BLEU = BP · exp((1/N) Σ_n log p_n)   (0 … 100).

Smoothing of orders without any match (Chen and Cherry, "A Systematic Comparison of Smoothing Techniques for
Sentence-Level BLEU", WMT 2014), as sacrebleu names them:

* ``"exp"`` (the default, as in ``sacrebleu.corpus_bleu``; NIST's mteval-v13a method 3): the ``k``-th order with no
  match (counting from the lowest) gets ``p_n = 100 / (2^k · totals_n)``;
* ``"none"``: such an order has ``p_n = 0``, so BLEU is 0.

With either method, BLEU is 0 when no n-gram of any order matches, or when some order has no hypothesis n-gram at
all (every hypothesis shorter than ``n``); orders from the first such one on report precision 0.

:func:`repeat_rate` is the fraction of adjacent token pairs ``(y_{i-1}, y_i)`` with ``y_i = y_{i-1}``, the token
repetition typical of non-autoregressive (parallel) decoding.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["BleuScore", "BleuStatistics", "bleu_statistics", "corpus_bleu_statistics", "bleu_from_statistics",
           "corpus_bleu", "repeat_counts", "repeat_rate"]

SMOOTH_METHODS = ("exp", "none")

Tokens = tuple[Hashable, ...]


@dataclass(frozen=True)
class BleuStatistics:
    """BLEU's sufficient statistics for one hypothesis or a whole corpus; ``a + b`` sums two (same ``max_order``).

    Attributes:
        matches: per order ``n = 1 … max_order``, the clipped n-gram matches.
        totals: per order, the number of hypothesis n-grams.
        hypothesis_length: hypothesis tokens. reference_length: tokens of the closest reference (summed).
    """

    matches: tuple[int, ...]
    totals: tuple[int, ...]
    hypothesis_length: int
    reference_length: int

    def __post_init__(self) -> None:
        if not self.matches or len(self.matches) != len(self.totals):
            raise ValueError(f"BleuStatistics needs one match count and one total per n-gram order (at least one "
                             f"order), got {len(self.matches)} match counts and {len(self.totals)} totals.")

    @property
    def max_order(self) -> int:
        """The largest n-gram order counted."""
        return len(self.matches)

    def __add__(self, other: BleuStatistics) -> BleuStatistics:
        if not isinstance(other, BleuStatistics):
            return NotImplemented
        if other.max_order != self.max_order:
            raise ValueError(f"Cannot add BLEU statistics of max_order {self.max_order} and {other.max_order}; "
                             "compute every part of a corpus with the same max_order.")
        return BleuStatistics(tuple(map(operator.add, self.matches, other.matches)),
                              tuple(map(operator.add, self.totals, other.totals)),
                              self.hypothesis_length + other.hypothesis_length,
                              self.reference_length + other.reference_length)


@dataclass(frozen=True)
class BleuScore:
    """A corpus BLEU score.

    Attributes:
        score: BLEU in ``[0, 100]``.
        precisions: per order ``n = 1 … max_order``, the (smoothed) n-gram precision in percent.
        brevity_penalty: ``BP`` in ``[0, 1]``.
        hypothesis_length: total hypothesis tokens ``c``. reference_length: total closest-reference tokens ``r``.
    """

    score: float
    precisions: tuple[float, ...]
    brevity_penalty: float
    hypothesis_length: int
    reference_length: int


def _tokens(sequence: Any, what: str) -> Tokens:
    """``sequence`` (list/tuple of hashable tokens, or a 1-D tensor/array) as a tuple of tokens, validated."""
    if isinstance(sequence, (str, bytes)):
        raise ValueError(f"{what} is a string ({sequence[:40]!r}); BLEU here compares token sequences, so split text "
                         "into tokens first (e.g. text.split()) or pass token ids.")
    if isinstance(sequence, (torch.Tensor, np.ndarray)):
        if sequence.ndim != 1:
            raise ValueError(f"{what} must be a 1-D sequence of tokens, got an array of shape {tuple(sequence.shape)}; "
                             "pass one sequence per hypothesis and a list of sequences per hypothesis' references.")
        return tuple(sequence.tolist())
    if not isinstance(sequence, Sequence):
        raise ValueError(f"{what} must be a sequence of tokens (a list, tuple or 1-D tensor), got "
                         f"{type(sequence).__name__}. Hypotheses are a list of sequences and references a list (one "
                         "per hypothesis) of lists of sequences: wrap single references as [[ref] for ref in refs].")
    return tuple(sequence)


def _reference_tokens(references: Any, what: str) -> list[Tokens]:
    """One hypothesis' references (a non-empty list of token sequences) as tuples of tokens, validated."""
    if isinstance(references, (str, bytes)) or not isinstance(references, (Sequence, torch.Tensor, np.ndarray)):
        raise ValueError(f"{what} must be a list of reference token sequences, got {type(references).__name__}.")
    if len(references) == 0:
        raise ValueError(f"{what} is an empty list; every hypothesis needs at least one reference (a reference may "
                         "itself be empty, the list of them may not).")
    return [_tokens(reference, f"{what}[{index}]") for index, reference in enumerate(references)]


def _check_max_order(max_order: Any) -> None:
    if not isinstance(max_order, (int, np.integer)) or isinstance(max_order, bool) or max_order < 1:
        raise ValueError(f"max_order must be an int >= 1 (the largest n-gram order; BLEU-4 uses 4), got {max_order!r}.")


def _check_smooth(smooth: Any) -> None:
    if smooth not in SMOOTH_METHODS:
        raise ValueError(f"Unknown BLEU smoothing {smooth!r}; choose 'exp' (sacrebleu's default: the k-th order "
                         "without a match gets precision 100 / (2^k · total)) or 'none' (such an order makes BLEU 0).")


def _ngram_counts(tokens: Tokens, max_order: int) -> Counter[Tokens]:
    """Counts of every n-gram of ``tokens`` for ``n = 1 … max_order`` (an n-gram is a tuple of n tokens)."""
    return Counter(tokens[start:start + n] for n in range(1, max_order + 1) for start in range(len(tokens) - n + 1))


def _pair_statistics(hypothesis: Tokens, references: list[Tokens], max_order: int) -> BleuStatistics:
    """The statistics of one validated hypothesis against its validated, non-empty references."""
    clip: Counter[Tokens] = Counter()
    for reference in references:
        clip |= _ngram_counts(reference, max_order)  # Counter union keeps the maximum count of each n-gram
    matches, totals = [0] * max_order, [0] * max_order
    for ngram, count in _ngram_counts(hypothesis, max_order).items():
        totals[len(ngram) - 1] += count
        matches[len(ngram) - 1] += min(count, clip[ngram])
    length = len(hypothesis)
    closest = min((len(reference) for reference in references), key=lambda size: (abs(size - length), size))
    return BleuStatistics(tuple(matches), tuple(totals), length, closest)


def bleu_statistics(hypothesis: Any, references: Any, max_order: int = 4) -> BleuStatistics:
    """BLEU's statistics of one hypothesis against its references.

    Args:
        hypothesis: a token sequence ``(L,)`` (list/tuple of ints or strings, or a 1-D tensor/array).
        references: a non-empty list of token sequences ``(L_j,)``, the valid outputs for this hypothesis.
        max_order: the largest n-gram order.
    """
    _check_max_order(max_order)
    return _pair_statistics(_tokens(hypothesis, "hypothesis"), _reference_tokens(references, "references"),
                            int(max_order))


def corpus_bleu_statistics(hypotheses: Any, references: Any, max_order: int = 4) -> BleuStatistics:
    """BLEU's statistics summed over a corpus: ``hypotheses`` is a list of ``H`` token sequences and ``references``
    a list of ``H`` non-empty lists of token sequences (``references[i]`` are hypothesis ``i``'s references; their
    number may differ between hypotheses)."""
    _check_max_order(max_order)
    if isinstance(hypotheses, (str, bytes)) or not isinstance(hypotheses, (Sequence, torch.Tensor, np.ndarray)):
        raise ValueError(f"hypotheses must be a list of token sequences, got {type(hypotheses).__name__}.")
    if len(hypotheses) == 0:
        raise ValueError("BLEU of an empty corpus is undefined: hypotheses is empty. Pass at least one hypothesis "
                         "with its references.")
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence) or \
            len(references) != len(hypotheses):
        count = len(references) if isinstance(references, Sequence) else type(references).__name__
        raise ValueError(f"references must be a list with one list of references per hypothesis: got {count} for "
                         f"{len(hypotheses)} hypotheses. (sacrebleu takes reference *streams*, one list per "
                         "reference index; here transpose them: [list(refs) for refs in zip(*streams)].)")
    parts = (_pair_statistics(_tokens(hypothesis, f"hypotheses[{index}]"),
                              _reference_tokens(refs, f"references[{index}]"), int(max_order))
             for index, (hypothesis, refs) in enumerate(zip(hypotheses, references, strict=True)))
    return functools.reduce(operator.add, parts)


def _brevity_penalty(hypothesis_length: int, reference_length: int) -> float:
    if hypothesis_length >= reference_length:
        return 1.0
    return math.exp(1 - reference_length / hypothesis_length) if hypothesis_length > 0 else 0.0


def bleu_from_statistics(statistics: BleuStatistics, smooth: str = "exp") -> BleuScore:
    """The BLEU score of summed :class:`BleuStatistics` (see the module docstring for ``smooth``: "exp" or "none")."""
    _check_smooth(smooth)
    penalty = _brevity_penalty(statistics.hypothesis_length, statistics.reference_length)
    precisions = [0.0] * statistics.max_order
    if any(statistics.matches):
        unmatched_orders = 0
        for order, (matches, total) in enumerate(zip(statistics.matches, statistics.totals, strict=True)):
            if total == 0:  # no hypothesis n-gram of this order: it and the higher orders keep precision 0
                break
            if matches > 0:
                precisions[order] = 100.0 * matches / total
            elif smooth == "exp":
                unmatched_orders += 1
                precisions[order] = 100.0 / (2 ** unmatched_orders * total)
    score = 0.0
    if all(precision > 0 for precision in precisions):
        score = penalty * math.exp(sum(math.log(precision) for precision in precisions) / statistics.max_order)
    return BleuScore(score=score, precisions=tuple(precisions), brevity_penalty=penalty,
                     hypothesis_length=statistics.hypothesis_length, reference_length=statistics.reference_length)


def corpus_bleu(hypotheses: Any, references: Any, max_order: int = 4, smooth: str = "exp") -> BleuScore:
    """Corpus BLEU of ``H`` hypotheses against their references, as ``sacrebleu.corpus_bleu`` computes it.

    Args:
        hypotheses: ``H`` token sequences ``(L_i,)``, each a list/tuple of ints or strings, or a 1-D tensor/array.
        references: ``H`` non-empty lists of token sequences; ``references[i]`` holds hypothesis ``i``'s references
            (the count may differ between hypotheses). Note sacrebleu's layout is the transpose (reference streams).
        max_order: the largest n-gram order (BLEU-4: 4).
        smooth: ``"exp"`` (default, sacrebleu's default) or ``"none"``; see the module docstring.

    Returns:
        A :class:`BleuScore` (score and precisions in percent).
    """
    _check_smooth(smooth)  # before the corpus is counted
    return bleu_from_statistics(corpus_bleu_statistics(hypotheses, references, max_order), smooth)


def repeat_counts(sequences: Any) -> tuple[int, int]:
    """``(repeats, pairs)`` over a list of token sequences ``(L_i,)``: ``pairs`` is the number of adjacent pairs
    ``(y_{i-1}, y_i)`` (``L_i − 1`` per sequence of length ``L_i ≥ 1``), ``repeats`` those with ``y_i = y_{i-1}``."""
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, (Sequence, torch.Tensor, np.ndarray)):
        raise ValueError(f"sequences must be a list of token sequences, got {type(sequences).__name__}.")
    repeats = pairs = 0
    for index, sequence in enumerate(sequences):
        tokens = _tokens(sequence, f"sequences[{index}]")
        pairs += max(len(tokens) - 1, 0)
        repeats += sum(previous == current for previous, current in itertools.pairwise(tokens))
    return repeats, pairs


def repeat_rate(sequences: Any) -> float:
    """The fraction of adjacent token pairs that repeat, pooled over ``sequences`` (a list of token sequences
    ``(L_i,)``); 0.0 when there is no pair at all (every sequence of length ≤ 1)."""
    repeats, pairs = repeat_counts(sequences)
    return repeats / pairs if pairs else 0.0
