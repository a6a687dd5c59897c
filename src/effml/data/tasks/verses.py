"""Translating real text: verse-aligned Bibles (KJV→WEB, archaic→modern English; KJV→RV1909, English→Spanish).

The pairs come from :func:`effml.data.load_parallel_verses` (the Debian SWORD modules of ``shared/DATA.md``), without
the chapters where the two modules number verses differently (:meth:`ParallelVerses.drop_gapped_chapters`), split by
book (train, valid, test: no verse crosses splits). One byte-level BPE vocabulary (:class:`effml.data.BPETokenizer`)
is trained on the training split's sources and targets together, deterministically, so every process of a run
builds the same one; pairs longer than ``max_length`` tokens on either side are left out of every split (the
models' position tables end there), and :meth:`VerseTranslation.split_sizes` says how many remain.

Ids follow :class:`effml.data.tasks.translation.TranslationTask`: ``0 … 4`` are PAD, BOS, EOS, MASK and LENGTH, then
BPE id ``i`` is ``5 + i``, on both sides. Training examples (:meth:`VerseTranslation.sample`) are drawn from the
training split with replacement; evaluation scores a fixed set of held-out pairs (``eval_split``), whatever the
seed: all of them, or ``n`` evenly spaced through the split (so every held-out book is represented). BLEU is computed
on the decoded text's words and punctuation marks (``\\w+|[^\\w\\s]``, close to sacrebleu's 13a tokenization, though
it also splits at apostrophes), one reference per source; exact match, length accuracy and the stutter rate are on
BPE tokens.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from effml.data.batches import rank_batch_ranges
from effml.data.tasks.base import check_int_param, register_task
from effml.data.tasks.translation import TranslationBatch, TranslationTask

__all__ = ["VerseTranslation"]

EVAL_SPLITS = ("valid", "test")
_WORDS = re.compile(r"\w+|[^\w\s]")


class _Split(NamedTuple):
    """One split's kept pairs as BPE ids (offset by the special ids), and how many pairs were too long."""

    sources: tuple[np.ndarray, ...]
    targets: tuple[np.ndarray, ...]
    too_long: int


class _EncodedVerses(NamedTuple):
    tokenizer: object  # effml.data.BPETokenizer
    splits: dict[str, _Split]


@register_task
@dataclass(frozen=True)
class VerseTranslation(TranslationTask):
    """Translate a verse of ``source_module`` into ``target_module``; see the module docstring.

    Loading the modules and training the tokenizer take 10–20 s, once per process and task (cached): the
    constructor only checks the parameters, so building a task to read ``max_target_length`` costs nothing.
    Raises ``effml.data.SwordModuleNotFoundError`` (naming the ``apt-get install`` command) when first used without
    the modules.
    """

    finite_training_set: ClassVar[bool] = True
    name: ClassVar[str] = "verse-translation"

    source_module: str = "KJV"
    target_module: str = "WEB"
    bpe_vocab: int = 4000  # BPE ids at most (256 bytes + 1 separator + merges)
    max_length: int = 48   # longest source and target kept, in BPE tokens
    eval_split: str = "test"
    root: str | None = None  # the SWORD library; None: $SWORD_PATH, else /usr/share/sword

    def __post_init__(self) -> None:
        check_int_param(self.name, "bpe_vocab", self.bpe_vocab, minimum=257)
        check_int_param(self.name, "max_length", self.max_length)
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"Task {self.name!r}: eval_split must be one of {', '.join(EVAL_SPLITS)} (train pairs "
                             f"are what the model learns from), got {self.eval_split!r}.")

    def _data(self) -> _EncodedVerses:
        """The encoded splits and tokenizer, cached per task and library directory (``$SWORD_PATH`` may change)."""
        from effml.data.parallel_text import library_root

        return _encoded_verses(self, os.fspath(library_root(self.root)))

    # -- vocabulary ------------------------------------------------------------------------------------------------

    @property
    def source_offset(self) -> int:
        """Id of BPE id 0 in a source (sources and targets share the vocabulary)."""
        return self.n_special

    @property
    def target_offset(self) -> int:
        """Id of BPE id 0 in a target: target ids are ``target_offset … vocab_size - 1``."""
        return self.n_special

    @property
    def vocab_size(self) -> int:
        """The special ids and the BPE vocabulary's."""
        return self.n_special + self.tokenizer.vocab_size

    @property
    def max_target_length(self) -> int:
        return self.max_length

    @property
    def tokenizer(self):
        """The BPE tokenizer trained on the training split (an ``effml.data.BPETokenizer``)."""
        return self._data().tokenizer

    def encode(self, text: str) -> list[int]:
        """A text's ids (BPE ids offset by the special ids; no BOS/EOS), e.g. a source to translate."""
        return [int(i) + self.n_special for i in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of a sequence of ids; special ids (PAD, BOS, EOS, MASK, LENGTH) have no text and are skipped."""
        return self.tokenizer.decode([int(i) - self.n_special for i in ids if int(i) >= self.n_special])

    def bleu_tokens(self, ids: list[int]) -> list[str]:
        """The words and punctuation marks of the decoded text (what BLEU counts)."""
        return _WORDS.findall(self.decode(ids))

    def split_sizes(self) -> dict[str, tuple[int, int]]:
        """Per split (train, valid, test): (pairs kept, pairs left out as longer than ``max_length`` tokens)."""
        return {name: (len(split.sources), split.too_long) for name, split in self._data().splits.items()}

    # -- examples --------------------------------------------------------------------------------------------------

    def _batch(self, split: _Split, indices: np.ndarray) -> TranslationBatch:
        """The pairs ``indices`` of ``split``, PAD-padded to the batch's longest source and target."""
        sources = [split.sources[i] for i in indices]
        targets = [split.targets[i] for i in indices]
        padded_sources, source_lengths = _padded(sources, self.pad_id)
        padded_targets, target_lengths = _padded(targets, self.pad_id)
        return TranslationBatch(sources=padded_sources, source_lengths=source_lengths, targets=padded_targets,
                                target_lengths=target_lengths, dialects=torch.zeros(len(indices), dtype=torch.bool),
                                alternatives=padded_targets.clone(), alternative_lengths=target_lengths.clone())

    @property
    def training_size(self) -> int:
        """The number of training pairs (a finite set: :meth:`sample` draws from it)."""
        return len(self._data().splits["train"].sources)

    def sample_indices(self, batch_size: int, seed: int) -> np.ndarray:
        """The int64 ``(batch_size,)`` training-pair indices :meth:`sample` draws: uniformly, with replacement, by
        ``numpy.random.default_rng(seed)``."""
        check_int_param(self.name, "batch_size", batch_size)
        check_int_param(self.name, "seed", seed, minimum=0)
        return np.random.default_rng(int(seed)).integers(0, self.training_size, size=batch_size)

    def training_batch(self, indices: Sequence[int] | np.ndarray) -> TranslationBatch:
        """The training pairs ``indices`` (each in ``[0, training_size)``) as one batch."""
        return self._batch(self._data().splits["train"], np.asarray(indices, dtype=np.int64))

    def sample(self, batch_size: int, seed: int) -> TranslationBatch:
        """``batch_size`` training pairs, ``training_batch(sample_indices(batch_size, seed))``."""
        return self.training_batch(self.sample_indices(batch_size, seed))

    def evaluation_examples(self, n: int, seed: int, batch_size: int, rank: int = 0,
                            world_size: int = 1) -> Iterator[TranslationBatch]:
        """Batches of ``batch_size`` of the held-out pairs: all of ``eval_split`` when ``n`` reaches its size, else
        ``n`` evenly spaced through it (``seed`` is not used: the held-out set is fixed); batch ``k`` goes to rank
        ``k % world_size``."""
        check_int_param(self.name, "n", n)
        held_out = self._data().splits[self.eval_split]
        count = min(n, len(held_out.sources))
        chosen = np.linspace(0, len(held_out.sources) - 1, count).round().astype(np.int64)
        for indices in rank_batch_ranges(count, batch_size, rank, world_size):
            yield self._batch(held_out, chosen[indices.start:indices.stop])


def _padded(sequences: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` id arrays as a PAD-padded int64 ``(B, longest)`` tensor and their int64 ``(B,)`` lengths."""
    lengths = np.array([len(sequence) for sequence in sequences], dtype=np.int64)
    padded = np.full((len(sequences), int(lengths.max())), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        padded[row, :len(sequence)] = sequence
    return torch.from_numpy(padded), torch.from_numpy(lengths)


@functools.lru_cache(maxsize=4)
def _encoded_verses(task: VerseTranslation, root: str) -> _EncodedVerses:
    """Load the pairs, train the tokenizer on the training split and encode every split (once per task)."""
    from effml.data.parallel_text import load_parallel_verses
    from effml.data.tokenizers import BPETokenizer

    verses = load_parallel_verses(task.source_module, task.target_module, root=root).drop_gapped_chapters()
    splits = dict(zip(("train", "valid", "test"), verses.split_by_book(), strict=True))
    if not splits["train"] or not splits[task.eval_split]:
        empty = "train" if not splits["train"] else task.eval_split
        raise ValueError(f"Task {task.name!r}: the {empty} split of {task.source_module}→{task.target_module} has no "
                         "verse pairs; the modules share no verses in its books (see effml.data.parallel_text's "
                         "VALID_BOOKS and TEST_BOOKS).")
    tokenizer = BPETokenizer.train(splits["train"].sources + splits["train"].targets, task.bpe_vocab)
    encoded = {}
    for name, verse_pairs in splits.items():
        sources = tokenizer.encode_batch(verse_pairs.sources)
        targets = tokenizer.encode_batch(verse_pairs.targets)
        kept = [index for index, (source, target) in enumerate(zip(sources, targets, strict=True))
                if len(source) <= task.max_length and len(target) <= task.max_length]
        encoded[name] = _Split(tuple(sources[i] + task.n_special for i in kept),
                               tuple(targets[i] + task.n_special for i in kept), len(sources) - len(kept))
    if not encoded["train"].sources or not encoded[task.eval_split].sources:
        raise ValueError(f"Task {task.name!r}: no verse pair of the train or {task.eval_split} split fits in "
                         f"max_length = {task.max_length} tokens; raise max_length.")
    return _EncodedVerses(tokenizer, encoded)
