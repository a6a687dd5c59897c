"""The synthetic translation task: determinism, padding, the transform's properties checked through the public API
(reversal, one spelling per dialect, fresh long-spelling tokens), and evaluation (oracles of either dialect, mixed
dialects, stutter, rank-split sums equal to one process, validation)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from effml.data.tasks import TASKS, SyntheticTranslation, TranslationBatch, build_task

TASK = SyntheticTranslation(n_symbols=10, n_ambiguous=4, min_length=4, max_length=9, map_seed=3)


def spellings(task: SyntheticTranslation) -> dict[int, tuple[list[int], list[int]]]:
    """Source id → (dialect-0 spelling, dialect-1 spelling), read off one-symbol translations."""
    symbols = range(task.source_offset, task.source_offset + task.n_symbols)
    return {symbol: (task.translate([symbol], 0), task.translate([symbol], 1)) for symbol in symbols}


def rows(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:length] for row, length in zip(ids.tolist(), lengths.tolist(), strict=True)]


def test_registered_and_sample_is_a_pure_function_of_seed() -> None:
    assert TASKS["synthetic-translation"] is SyntheticTranslation
    assert build_task("synthetic-translation", n_symbols=10, n_ambiguous=4, min_length=4, max_length=9,
                      map_seed=3) == TASK
    first, again, other = TASK.sample(32, 5), TASK.sample(32, 5), TASK.sample(32, 6)
    assert isinstance(first, TranslationBatch) and len(first) == 32
    for field in dataclasses.fields(TranslationBatch):
        assert torch.equal(getattr(first, field.name), getattr(again, field.name)), field.name
    assert not torch.equal(first.sources, other.sources)
    # the map seed changes the spellings, not the drawn sources and dialects
    remapped = dataclasses.replace(TASK, map_seed=4).sample(32, 5)
    assert torch.equal(remapped.sources, first.sources) and torch.equal(remapped.dialects, first.dialects)
    assert not torch.equal(remapped.targets, first.targets)


def test_shapes_padding_and_lengths_are_consistent() -> None:
    batch = TASK.sample(2048, 0)
    assert batch.sources.shape == (2048, TASK.max_length)
    assert batch.targets.shape == batch.alternatives.shape == (2048, TASK.max_target_length) == (2048, 18)
    assert batch.sources.dtype == batch.targets.dtype == batch.alternatives.dtype == torch.int64
    assert batch.dialects.dtype == torch.bool
    assert set(batch.source_lengths.tolist()) == set(range(TASK.min_length, TASK.max_length + 1))
    assert abs(batch.dialects.float().mean().item() - 0.5) < 0.05
    for ids, lengths, low, high in ((batch.sources, batch.source_lengths, TASK.source_offset, TASK.target_offset),
                                    (batch.targets, batch.target_lengths, TASK.target_offset, TASK.vocab_size),
                                    (batch.alternatives, batch.alternative_lengths, TASK.target_offset,
                                     TASK.vocab_size)):
        inside = torch.arange(ids.shape[1]) < lengths[:, None]
        assert torch.all(ids[~inside] == TASK.pad_id)
        assert torch.all((ids[inside] >= low) & (ids[inside] < high))
    assert set(batch.sources[batch.sources != TASK.pad_id].tolist()) == set(range(TASK.source_offset,
                                                                                  TASK.target_offset))
    moved = batch.to("cpu")
    assert len(moved) == 2048 and torch.equal(moved.targets, batch.targets)
    assert torch.equal(moved.alternative_lengths, batch.alternative_lengths)


def test_spelling_map_one_token_per_symbol_and_fresh_two_token_long_spellings() -> None:
    spelt = spellings(TASK)
    ambiguous = {symbol for symbol, (short, long) in spelt.items() if short != long}
    assert ambiguous == set(TASK.ambiguous_symbols) and len(ambiguous) == TASK.n_ambiguous
    assert all(len(short) == 1 for short, _ in spelt.values())
    assert all(len(long) == (2 if symbol in ambiguous else 1) for symbol, (_, long) in spelt.items())
    short_tokens = [short[0] for short, _ in spelt.values()]
    long_tokens = [token for symbol in ambiguous for token in spelt[symbol][1]]
    assert len(set(short_tokens)) == TASK.n_symbols  # invertible: a different token per symbol
    assert len(set(long_tokens)) == 2 * TASK.n_ambiguous and not set(long_tokens) & set(short_tokens)
    # together they are exactly the target range of the vocabulary
    assert set(short_tokens) | set(long_tokens) == set(range(TASK.target_offset, TASK.vocab_size))
    assert TASK.vocab_size == SyntheticTranslation.n_special + 2 * TASK.n_symbols + 2 * TASK.n_ambiguous
    assert spellings(dataclasses.replace(TASK, map_seed=4)) != spelt


def test_targets_are_the_reversed_source_spelt_in_one_dialect() -> None:
    spelt = spellings(TASK)
    unambiguous = [symbol for symbol in spelt if symbol not in TASK.ambiguous_symbols]
    source = unambiguous[:3] + unambiguous[::-1]
    expected = [spelt[symbol][0][0] for symbol in reversed(source)]
    assert TASK.translate(source, 0) == TASK.translate(source, 1) == expected
    assert TASK.references(source) == [expected] and TASK.references(torch.tensor(source)) == [expected]

    batch = TASK.sample(512, 1)
    valid = batch.valid_targets()
    targets, alternatives = rows(batch.targets, batch.target_lengths), rows(batch.alternatives,
                                                                             batch.alternative_lengths)
    for index, source in enumerate(rows(batch.sources, batch.source_lengths)):
        dialect = int(batch.dialects[index])
        target = [token for symbol in reversed(source) for token in spelt[symbol][dialect]]
        alternative = [token for symbol in reversed(source) for token in spelt[symbol][1 - dialect]]
        assert targets[index] == target and alternatives[index] == alternative
        n_ambiguous = sum(symbol in TASK.ambiguous_symbols for symbol in source)
        assert len(target) - len(alternative) == (n_ambiguous if dialect else -n_ambiguous)
        assert len(valid[index]) == len(TASK.references(source)) == (2 if n_ambiguous else 1)
        assert sorted(valid[index]) == sorted(TASK.references(source))


def test_one_token_second_spellings_give_dialects_of_the_same_length() -> None:
    task = dataclasses.replace(TASK, second_spelling_tokens=1)
    spelt = spellings(task)
    assert all(len(short) == len(long) == 1 for short, long in spelt.values())
    second = {spelt[symbol][1][0] for symbol in task.ambiguous_symbols}
    firsts = {short[0] for short, _ in spelt.values()}
    assert len(second) == task.n_ambiguous and not second & firsts  # fresh tokens, one per ambiguous symbol
    assert task.vocab_size == SyntheticTranslation.n_special + 2 * task.n_symbols + task.n_ambiguous
    assert task.max_target_length == task.max_length
    batch = task.sample(512, 3)
    assert torch.equal(batch.target_lengths, batch.alternative_lengths)
    assert torch.equal(batch.target_lengths, batch.source_lengths)
    ambiguous = torch.isin(batch.sources, torch.tensor(task.ambiguous_symbols)).sum(1)
    differing = (batch.targets != batch.alternatives).sum(1)
    assert torch.equal(differing, ambiguous)  # exactly the ambiguous symbols' positions tell the dialects apart
    with pytest.raises(ValueError, match="second_spelling_tokens"):
        dataclasses.replace(TASK, second_spelling_tokens=3)


def test_long_spelling_tokens_never_appear_in_a_short_dialect_target() -> None:
    spelt = spellings(TASK)
    long_tokens = {token for symbol in TASK.ambiguous_symbols for token in spelt[symbol][1]}
    ambiguous_short = {spelt[symbol][0][0] for symbol in TASK.ambiguous_symbols}
    batch = TASK.sample(1024, 2)
    short_targets = torch.where(batch.dialects[:, None], batch.alternatives, batch.targets)
    long_targets = torch.where(batch.dialects[:, None], batch.targets, batch.alternatives)
    assert not set(short_targets.unique().tolist()) & long_tokens
    assert not set(long_targets.unique().tolist()) & ambiguous_short
    assert set(long_targets.unique().tolist()) >= long_tokens  # the long dialect does use them


def test_without_ambiguous_symbols_there_is_one_target() -> None:
    task = SyntheticTranslation(n_symbols=6, n_ambiguous=0, min_length=2, max_length=5)
    batch = task.sample(64, 0)
    assert task.max_target_length == task.max_length and batch.targets.shape == (64, 5)
    assert torch.equal(batch.targets, batch.alternatives) and torch.equal(batch.target_lengths, batch.source_lengths)
    assert all(len(valid) == 1 for valid in batch.valid_targets())


def sampled_targets(batch: TranslationBatch) -> list[torch.Tensor]:
    return [row[:length] for row, length in zip(batch.targets, batch.target_lengths.tolist(), strict=True)]


def test_oracles_of_either_dialect_score_perfectly() -> None:
    sampled = TASK.evaluate(sampled_targets, n=200, seed=0, batch_size=32)  # 1-D tensors as outputs
    other = TASK.evaluate(lambda batch: rows(batch.alternatives, batch.alternative_lengths), n=200, seed=0,
                          batch_size=32)
    for metrics in (sampled, other):
        assert metrics["exact_match"] == 1.0 and metrics["length_accuracy"] == 1.0
        assert metrics["bleu"] == pytest.approx(100.0)
    assert sampled["repeat_rate"] == sampled["reference_repeat_rate"] > 0  # a data property, reported for context
    assert other["reference_repeat_rate"] == sampled["reference_repeat_rate"]


def test_mixing_dialects_within_an_example_is_wrong() -> None:
    spelt = spellings(TASK)
    counts = {"mixed": 0, "examples": 0}

    def mix(batch: TranslationBatch) -> list[list[int]]:
        """The first ambiguous symbol (in target order) spelt long, the others short."""
        outputs = []
        for source in rows(batch.sources, batch.source_lengths):
            seen, output = 0, []
            for symbol in reversed(source):
                seen += symbol in TASK.ambiguous_symbols
                output += spelt[symbol][1 if seen == 1 and symbol in TASK.ambiguous_symbols else 0]
            counts["mixed"] += seen >= 2
            counts["examples"] += 1
            outputs.append(output)
        return outputs

    metrics = TASK.evaluate(mix, n=300, seed=1, batch_size=64)
    assert counts["examples"] == 300 and counts["mixed"] > 100
    assert metrics["exact_match"] == pytest.approx(1 - counts["mixed"] / 300)
    assert metrics["length_accuracy"] == pytest.approx(1 - counts["mixed"] / 300)  # its length fits neither
    assert 50 < metrics["bleu"] < 100


def test_repeat_rate_of_a_stuttering_predictor() -> None:
    targets: list[list[int]] = []

    def stutter(batch: TranslationBatch) -> list[list[int]]:
        targets.extend(rows(batch.targets, batch.target_lengths))
        return [[token for token in target for _ in range(2)] for target in rows(batch.targets, batch.target_lengths)]

    metrics = TASK.evaluate(stutter, n=100, seed=2, batch_size=40)
    # a doubled target of length L has 2L - 1 pairs: L repeats within the copies plus the target's own repeats r
    own_repeats = sum(a == b for target in targets for a, b in itertools.pairwise(target))
    lengths = [len(target) for target in targets]
    assert metrics["repeat_rate"] == pytest.approx((sum(lengths) + own_repeats) / sum(2 * n - 1 for n in lengths))
    assert own_repeats > 0 and metrics["reference_repeat_rate"] == pytest.approx(own_repeats / sum(n - 1 for n in
                                                                                                    lengths))
    assert metrics["exact_match"] == 0.0


def test_rank_split_sums_give_the_one_process_metrics() -> None:
    def noisy(batch: TranslationBatch) -> list[list[int]]:  # drops 0, 1 or 2 final tokens, so the metrics are not 1
        return [target.tolist()[:len(target) - index % 3] for index, target in enumerate(sampled_targets(batch))]

    whole = TASK.evaluate(noisy, n=100, seed=4, batch_size=16)
    assert 0 < whole["exact_match"] < 1 and 0 < whole["bleu"] < 100
    for world_size in (3, 8):  # 7 batches: with 8 ranks, one rank has none
        sums = [TASK.evaluation_sums(noisy, 100, 4, 16, rank=rank, world_size=world_size)
                for rank in range(world_size)]
        assert TASK.metrics_from_sums(sums, 100) == pytest.approx(whole, abs=1e-12)


def test_bad_parameters_and_outputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="n_ambiguous=5 exceeds n_symbols=4"):
        SyntheticTranslation(n_symbols=4, n_ambiguous=5)
    with pytest.raises(ValueError, match="min_length=9 exceeds max_length=8"):
        SyntheticTranslation(min_length=9, max_length=8)
    for params in ({"n_symbols": 0}, {"n_ambiguous": -1}, {"min_length": 0}, {"map_seed": -1},
                   {"max_length": True}):
        with pytest.raises(ValueError, match="synthetic-translation"):
            SyntheticTranslation(**params)
    with pytest.raises(ValueError, match="Unknown parameter"):
        build_task("synthetic-translation", n_symbol=4)
    with pytest.raises(ValueError, match="seed"):
        TASK.sample(4, -1)
    with pytest.raises(ValueError, match="source ids"):
        TASK.translate([0, TASK.source_offset], 0)  # PAD is not a source symbol
    with pytest.raises(ValueError, match="dialect"):
        TASK.translate([TASK.source_offset], 2)
    with pytest.raises(ValueError, match="one predicted target per example"):
        TASK.evaluate(lambda batch: sampled_targets(batch)[:-1], n=8, seed=0)
    with pytest.raises(ValueError, match="integer token ids"):
        TASK.evaluate(lambda batch: [target.float() for target in sampled_targets(batch)], n=8, seed=0)
