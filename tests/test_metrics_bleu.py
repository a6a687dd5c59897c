"""Corpus BLEU: hand-computed cases (clipping, smoothing, multi-reference clipping, closest-reference brevity),
additivity of its statistics, agreement with sacrebleu on random corpora; the repeated-adjacent-token rate."""

from __future__ import annotations

import math
import random

import pytest
import torch

from effml.metrics import (BleuStatistics, bleu_from_statistics, bleu_statistics, corpus_bleu, corpus_bleu_statistics,
                           repeat_counts, repeat_rate)


def test_perfect_match_scores_100_for_ints_strings_and_tensors() -> None:
    hypotheses = [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    references = [[[1, 2, 3, 4, 5]], [[9, 9], [6, 7, 8, 9]]]
    for smooth in ("exp", "none"):
        score = corpus_bleu(hypotheses, references, smooth=smooth)
        assert score.score == pytest.approx(100.0) and score.precisions == pytest.approx((100.0,) * 4)
        assert score.brevity_penalty == 1.0 and score.hypothesis_length == score.reference_length == 9
    as_strings = [[str(token) for token in hypothesis] for hypothesis in hypotheses]
    assert corpus_bleu(as_strings, [[[str(t) for t in ref] for ref in refs] for refs in references]).score == \
        pytest.approx(100.0)
    assert corpus_bleu([torch.tensor(h) for h in hypotheses],
                       [[torch.tensor(r) for r in refs] for refs in references]).score == pytest.approx(100.0)


def test_no_four_gram_match_is_zero_without_smoothing_and_exp_smoothed_otherwise() -> None:
    # hypothesis 1 2 3 4 5 6 against reference 1 2 3 9 4 5 6: 6/6 unigrams, 4/5 bigrams, 2/4 trigrams, 0/3 4-grams
    hypotheses, references = [[1, 2, 3, 4, 5, 6]], [[[1, 2, 3, 9, 4, 5, 6]]]
    unsmoothed = corpus_bleu(hypotheses, references, smooth="none")
    assert unsmoothed.score == 0.0 and unsmoothed.precisions == pytest.approx((100.0, 80.0, 50.0, 0.0))
    smoothed = corpus_bleu(hypotheses, references)  # 'exp': the first unmatched order gets 100 / (2 · 3)
    assert smoothed.precisions == pytest.approx((100.0, 80.0, 50.0, 100 / 6))
    penalty = math.exp(1 - 7 / 6)
    assert smoothed.brevity_penalty == pytest.approx(penalty)
    assert smoothed.score == pytest.approx(penalty * (100 * 80 * 50 * 100 / 6) ** 0.25)


def test_worked_example_with_clipping() -> None:
    # hypothesis 1 1 1 2, reference 1 2 1 3. Unigrams: "1" three times, clipped to the reference's two, "2" once:
    # p1 = 3/4. Bigrams (1 1) ×2, (1 2) ×1; the reference has (1 2), (2 1), (1 3): p2 = 1/3. Equal lengths: BP = 1.
    # BLEU-2 = 100 · sqrt(3/4 · 1/3) = 50. With 4-grams, trigrams match 0/2 and 4-grams 0/1; 'exp' smoothing gives
    # them 100/(2 · 2) = 25 % and 100/(4 · 1) = 25 %, so BLEU-4 = 100 · (3/4 · 1/3 · 1/4 · 1/4)^(1/4) = 100 / (2√2).
    hypotheses, references = [[1, 1, 1, 2]], [[[1, 2, 1, 3]]]
    assert corpus_bleu(hypotheses, references, max_order=2, smooth="none").score == pytest.approx(50.0)
    four = corpus_bleu(hypotheses, references)
    assert four.precisions == pytest.approx((75.0, 100 / 3, 25.0, 25.0))
    assert four.score == pytest.approx(100 / (2 * math.sqrt(2)))
    assert bleu_statistics([1, 1, 1, 2], [[1, 2, 1, 3]]) == BleuStatistics((3, 1, 0, 0), (4, 3, 2, 1), 4, 4)


def test_multi_reference_clipping_takes_the_max_count_over_references() -> None:
    # "1" occurs once in the first reference and twice in the second: three hypothesis 1s clip to 2 (not 1, not 3)
    statistics = bleu_statistics([1, 1, 1], [[1, 2, 3], [1, 1, 4]], max_order=2)
    assert statistics.matches == (2, 1) and statistics.totals == (3, 2)
    # bigram (1 1): zero times in the first reference, once in the second
    assert bleu_statistics([1, 1, 2, 3], [[1, 2, 3], [1, 1]], max_order=2).matches == (4, 3)


@pytest.mark.parametrize(("hypothesis_length", "reference_lengths", "closest"), [
    (5, (6, 9), 6),     # nearest is longer: BP < 1
    (5, (3, 7), 3),     # tie at distance 2: the shorter wins
    (5, (4, 6), 4),     # tie at distance 1: the shorter wins
    (5, (2, 5, 8), 5),  # an exact length
    (0, (3, 1), 1),
])
def test_brevity_penalty_uses_the_closest_reference_length(hypothesis_length: int, reference_lengths: tuple[int, ...],
                                                           closest: int) -> None:
    hypothesis = list(range(hypothesis_length))
    references = [list(range(length)) for length in reference_lengths]
    statistics = bleu_statistics(hypothesis, references)
    assert statistics.hypothesis_length == hypothesis_length and statistics.reference_length == closest
    expected = 1.0 if hypothesis_length >= closest else \
        (math.exp(1 - closest / hypothesis_length) if hypothesis_length else 0.0)
    assert corpus_bleu([hypothesis], [references]).brevity_penalty == pytest.approx(expected)


def test_corpus_statistics_are_the_sum_of_per_sentence_statistics_not_an_average_of_scores() -> None:
    hypotheses = [[1, 2, 3, 4, 5], [7, 7, 8]]
    references = [[[1, 2, 3, 4, 5]], [[7, 8, 9, 10], [6]]]
    parts = [bleu_statistics(h, refs) for h, refs in zip(hypotheses, references, strict=True)]
    summed = parts[0] + parts[1]
    assert summed == corpus_bleu_statistics(hypotheses, references)
    assert summed == BleuStatistics((7, 5, 3, 2), (8, 6, 4, 2), 8, 9)
    assert corpus_bleu(hypotheses, references).score == pytest.approx(bleu_from_statistics(summed).score)
    mean_of_sentences = sum(bleu_from_statistics(part).score for part in parts) / 2
    assert corpus_bleu(hypotheses, references).score != pytest.approx(mean_of_sentences)


def test_an_order_without_hypothesis_ngrams_makes_bleu_zero() -> None:
    # all hypotheses shorter than 4 tokens: no 4-gram at all, so (as in sacrebleu) BLEU-4 is 0 even when smoothed
    score = corpus_bleu([[1, 2, 3]], [[[1, 2, 3]]])
    assert score.score == 0.0 and score.precisions == pytest.approx((100.0, 100.0, 100.0, 0.0))
    assert corpus_bleu([[1, 2, 3]], [[[1, 2, 3]]], max_order=3).score == pytest.approx(100.0)


def random_corpus(rng: random.Random, size: int, vocab: int, max_length: int) -> tuple[list, list]:
    """Hypotheses and 1–3 references each: noisy copies of the hypothesis (token swaps, drops), lengths 0…max."""
    hypotheses, references = [], []
    for _ in range(size):
        hypothesis = [rng.randrange(vocab) for _ in range(rng.randint(0, max_length))]
        refs = []
        for _ in range(rng.randint(1, 3)):
            reference = [token if rng.random() < 0.7 else rng.randrange(vocab) for token in hypothesis]
            refs.append([token for token in reference if rng.random() < 0.85] + [rng.randrange(vocab)]
                        * rng.randint(0, 2))
        hypotheses.append(hypothesis)
        references.append(refs)
    return hypotheses, references


@pytest.mark.parametrize("smooth", ["exp", "none"])
@pytest.mark.parametrize(("seed", "vocab", "max_length", "size"), [(0, 8, 20, 300), (1, 30, 6, 300), (2, 40, 4, 20)])
def test_agrees_with_sacrebleu_on_random_corpora(smooth: str, seed: int, vocab: int, max_length: int,
                                                 size: int) -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    hypotheses, references = random_corpus(random.Random(seed), size, vocab, max_length)
    # sacrebleu takes reference streams (stream j holds every hypothesis' j-th reference; None where there is none)
    depth = max(len(refs) for refs in references)
    streams = [[" ".join(map(str, refs[j])) if j < len(refs) else None for refs in references] for j in range(depth)]
    expected = sacrebleu.corpus_bleu([" ".join(map(str, h)) for h in hypotheses], streams, smooth_method=smooth,
                                     tokenize="none", force=True)
    ours = corpus_bleu(hypotheses, references, smooth=smooth)
    assert ours.score == pytest.approx(expected.score, abs=1e-9, rel=0)
    assert ours.precisions == pytest.approx(expected.precisions, abs=1e-9, rel=0)
    assert ours.brevity_penalty == pytest.approx(expected.bp, abs=1e-12, rel=0)
    assert (ours.hypothesis_length, ours.reference_length) == (expected.sys_len, expected.ref_len)
    assert 5 < expected.score < 95 or smooth == "none"  # partial matches, not a degenerate 0 or 100
    if seed == 2:  # short sequences: the 4-grams have no match, so the comparison covers the smoothing
        statistics = corpus_bleu_statistics(hypotheses, references)
        assert statistics.matches[3] == 0 < statistics.totals[3]


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu([[1, 2]], [[]])
    with pytest.raises(ValueError, match="one list of references per hypothesis"):
        corpus_bleu([[1, 2], [3]], [[[1, 2]]])
    with pytest.raises(ValueError, match=r"wrap single references"):
        corpus_bleu([[1, 2]], [[1, 2]])  # a reference not wrapped in a list
    with pytest.raises(ValueError, match="split text"):
        corpus_bleu(["the cat"], [[["the", "cat"]]])
    with pytest.raises(ValueError, match="1-D"):
        corpus_bleu([torch.zeros(2, 3, dtype=torch.long)], [[[0, 0, 0]]])
    with pytest.raises(ValueError, match="smoothing"):
        corpus_bleu([[1]], [[[1]]], smooth="floor")
    with pytest.raises(ValueError, match="max_order"):
        corpus_bleu([[1]], [[[1]]], max_order=0)
    with pytest.raises(ValueError, match="max_order"):
        BleuStatistics((1,), (1,), 1, 1) + BleuStatistics((1, 0), (1, 0), 1, 1)


def test_repeat_rate_counts_adjacent_repeats_over_all_pairs() -> None:
    # pairs: [1,1,2,2,2] has 4 (3 repeats); [3] and [] have none; [4,5,4] has 2 (0 repeats) → 3 / 6
    sequences = [[1, 1, 2, 2, 2], [3], [], [4, 5, 4]]
    assert repeat_counts(sequences) == (3, 6)
    assert repeat_rate(sequences) == pytest.approx(0.5)
    assert repeat_rate([torch.tensor([7, 7, 7]), ["a", "b"]]) == pytest.approx(2 / 3)
    assert repeat_rate([[1, 2, 1, 2]]) == 0.0  # a repeat is only between neighbours
    assert repeat_rate([[5], []]) == 0.0 and repeat_rate([]) == 0.0
