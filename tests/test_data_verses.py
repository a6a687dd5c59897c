"""Verse translation on real-text pairs: split by book, one BPE vocabulary, length cap, fixed held-out set, BLEU on
words. Built on tiny SWORD modules written here (tests/sword_modules.py), so the Debian packages are not needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sword_modules import modern, write_toy_verse_pair

from effml.data.parallel_text import SwordModuleNotFoundError
from effml.data.tasks import VerseTranslation, build_task
from effml.metrics.bleu import corpus_bleu

@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sword")
    write_toy_verse_pair(root)
    return root


@pytest.fixture
def task(library: Path) -> VerseTranslation:
    return VerseTranslation(bpe_vocab=300, max_length=24, root=str(library))


def texts(task: VerseTranslation, batch, side: str = "sources") -> list[str]:
    ids, lengths = getattr(batch, side), getattr(batch, side[:-1] + "_lengths")
    return [task.decode(row[:length].tolist()) for row, length in zip(ids, lengths, strict=True)]


def test_training_examples_are_training_pairs_with_offset_ids(task: VerseTranslation, library: Path):
    batch = task.sample(64, seed=3)
    assert batch.sources.shape[0] == 64 and batch.sources.shape[1] == int(batch.source_lengths.max())
    for side in ("sources", "targets"):
        ids, lengths = getattr(batch, side), getattr(batch, side[:-1] + "_lengths")
        inside = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        assert bool((ids[inside] >= task.n_special).all() and (ids[inside] < task.vocab_size).all())
        assert bool((ids[~inside] == task.pad_id).all())
    sources = texts(task, batch)
    assert all(modern(source) == target for source, target in zip(sources, texts(task, batch, "targets"), strict=True))
    held_out = {text for b in task.evaluation_examples(100, 0, 8) for text in texts(task, b)}
    assert not held_out & set(sources)  # the held-out book never reaches training
    assert torch.equal(task.sample(64, seed=3).sources, batch.sources)
    indices = task.sample_indices(64, seed=3)
    assert indices.min() >= 0 and indices.max() < task.training_size == 41
    assert torch.equal(task.training_batch(indices).targets, batch.targets)
    assert not torch.equal(task.sample(64, seed=4).sources, batch.sources)
    assert torch.equal(batch.alternatives, batch.targets) and not bool(batch.dialects.any())


def test_pairs_longer_than_max_length_are_left_out(task: VerseTranslation):
    assert task.split_sizes() == {"train": (41, 1), "valid": (10, 0), "test": (22, 0)}
    lengths = torch.cat([task.sample(64, seed).source_lengths for seed in range(4)])
    assert int(lengths.max()) <= task.max_length
    roomy = VerseTranslation(bpe_vocab=300, max_length=400, root=task.root)
    assert roomy.split_sizes()["train"] == (42, 0)


def test_encode_and_decode_round_trip(task: VerseTranslation):
    text = "Thou hast said unto the people."
    ids = task.encode(text)
    assert min(ids) >= task.n_special and task.decode(ids) == text
    assert task.decode([task.bos_id, *ids, task.eos_id, task.pad_id]) == text
    assert task.bleu_tokens(ids) == ["Thou", "hast", "said", "unto", "the", "people", "."]


def reference_outputs(batch) -> list[list[int]]:
    return [row[:length].tolist() for row, length in zip(batch.targets, batch.target_lengths, strict=True)]


def source_outputs(batch) -> list[list[int]]:
    return [row[:length].tolist() for row, length in zip(batch.sources, batch.source_lengths, strict=True)]


def test_scores_match_the_definitions(task: VerseTranslation):
    perfect = task.evaluate(reference_outputs, n=1000, seed=0, batch_size=5)
    assert perfect["bleu"] == pytest.approx(100) and perfect["exact_match"] == 1 == perfect["length_accuracy"]
    copied = task.evaluate(source_outputs, n=1000, seed=0, batch_size=5)
    batches = list(task.evaluation_examples(1000, 0, 5))
    sources = [text for batch in batches for text in texts(task, batch)]
    targets = [text for batch in batches for text in texts(task, batch, "targets")]
    assert len(sources) == 22  # n beyond the held-out set: all of it, once
    words = [task.bleu_tokens(task.encode(text)) for text in sources]
    expected = corpus_bleu(words, [[task.bleu_tokens(task.encode(text))] for text in targets]).score
    assert copied["bleu"] == pytest.approx(expected) and 0 < expected < 100
    unchanged = sum(source == target for source, target in zip(sources, targets, strict=True))
    assert copied["exact_match"] == pytest.approx(unchanged / 22)


def test_fewer_held_out_examples_are_spread_over_the_split_whatever_the_seed(task: VerseTranslation):
    every = [text for batch in task.evaluation_examples(1000, 0, 8) for text in texts(task, batch)]
    chosen = [text for batch in task.evaluation_examples(8, 5, 3) for text in texts(task, batch)]
    assert chosen == [every[i] for i in (0, 3, 6, 9, 12, 15, 18, 21)]
    assert chosen == [text for batch in task.evaluation_examples(8, 6, 3) for text in texts(task, batch)]


def test_ranks_score_disjoint_shares_that_combine_to_one_process(task: VerseTranslation):
    one = task.evaluate(source_outputs, n=20, seed=0, batch_size=3)
    sums = [task.evaluation_sums(source_outputs, 20, 0, batch_size=3, rank=rank, world_size=2) for rank in (0, 1)]
    assert [part["examples"] for part in sums] == [11, 9]  # batches of 3, 3, 3, 3, 3, 3, 2: ranks take every other one
    assert task.metrics_from_sums(sums, 20) == pytest.approx(one)


def test_valid_split_and_registry(task: VerseTranslation):
    valid = VerseTranslation(bpe_vocab=300, max_length=24, root=task.root, eval_split="valid")
    assert sum(len(batch) for batch in valid.evaluation_examples(100, 0, 4)) == 10
    assert build_task("verse-translation", root=task.root, bpe_vocab=300) == VerseTranslation(root=task.root,
                                                                                             bpe_vocab=300)


@pytest.mark.parametrize(("params", "message"), [
    ({"eval_split": "train"}, "eval_split must be one of valid, test"),
    ({"bpe_vocab": 100}, "bpe_vocab must be an int >= 257"),
    ({"max_length": 0}, "max_length must be an int >= 1"),
])
def test_bad_parameters_are_refused(params, message: str):
    with pytest.raises(ValueError, match=message):
        VerseTranslation(**params)


def test_missing_modules_fail_on_first_use_with_the_install_command(tmp_path: Path):
    task = VerseTranslation(root=str(tmp_path))  # constructing it reads nothing
    assert task.max_target_length == 48
    with pytest.raises(SwordModuleNotFoundError, match="apt-get install"):
        task.sample(2, 0)


def test_the_library_directory_keys_the_cache(library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SWORD_PATH", str(library))
    assert VerseTranslation(bpe_vocab=300, max_length=24).split_sizes()["test"] == (22, 0)
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    with pytest.raises(SwordModuleNotFoundError):
        VerseTranslation(bpe_vocab=300, max_length=24).split_sizes()
