"""Tokenizers: the :class:`Tokenizer` protocol, a UTF-8 byte tokenizer, and a trainable byte-level BPE.

A tokenizer maps text to a 1-D integer array and back. Its ``fingerprint`` is a stable string that changes
whenever the text → ids mapping could change; token caches use it in their keys.

Both tokenizers here are byte-level, so every string is encodable and ``decode(encode(s)) == s`` for any valid
Unicode string. :class:`BPETokenizer` wraps the Hugging Face ``tokenizers`` library (byte-level pre-tokenizer
and decoder, BPE model) and always reserves :data:`DOCUMENT_SEPARATOR` as a special token, so a corpus joined
with that separator tokenizes exactly as its documents tokenized one by one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from effml.io import atomic_write_text

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "DOCUMENT_SEPARATOR", "token_dtype", "decodable_ids"]

#: Text placed between documents when a corpus is joined: the ASCII "file separator" control character
#: (one UTF-8 byte, absent from ordinary text). ByteTokenizer encodes it as byte 28; BPETokenizer reserves it
#: as a special token that merges never cross.
DOCUMENT_SEPARATOR = "\x1c"


@runtime_checkable
class Tokenizer(Protocol):
    """Anything that maps text to token ids and back.

    Attributes:
        vocab_size: number of distinct ids; every id is in ``[0, vocab_size)``.
        fingerprint: stable string identifying the exact text → ids mapping (used in cache keys).
    """

    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> np.ndarray:
        """Text → ids, a 1-D integer array of shape ``(n_tokens,)``."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids (any 1-D integer sequence) → text."""
        ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ids ``0 .. vocab_size - 1`` (uint8, uint16 or uint32)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}.")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32; use a smaller vocabulary.")


def decodable_ids(ids: Sequence[int] | np.ndarray, owner: str, vocab_size: int) -> list[int]:
    """``ids`` (shape ``(n,)``) as a list of ints, each checked to lie in ``[0, vocab_size)``; ``owner`` names the
    tokenizer in messages."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got an array of shape {array.shape}; "
                         "decode one sequence at a time.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"decode expects integer ids, got dtype {array.dtype}.")
    id_list = array.astype(np.int64).tolist()
    outside = [i for i in id_list if not 0 <= i < vocab_size]
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise ValueError(f"{owner}.decode: id {outside[0]}{more} is outside the vocabulary of {vocab_size} ids "
                         f"(valid ids are 0..{vocab_size - 1}); these ids did not come from this tokenizer, so decode "
                         "them with the tokenizer (and model vocabulary) that produced them.")
    return id_list


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, id = byte value. Decoding replaces invalid byte sequences with U+FFFD."""

    vocab_size: int = 256
    fingerprint: str = "byte-utf8-v1"

    def encode(self, text: str) -> np.ndarray:
        """Text → its UTF-8 bytes as int64 ids, shape ``(len(text.encode("utf-8")),)``."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}.")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids in ``[0, 256)`` → text (``errors="replace"`` for byte sequences that are not valid UTF-8)."""
        return bytes(decodable_ids(ids, "ByteTokenizer", self.vocab_size)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """Byte-level BPE (``tokenizers`` library) with :data:`DOCUMENT_SEPARATOR` reserved as a special token.

    Build one with :meth:`train` or :meth:`load`; wrapping an existing ``tokenizers.Tokenizer`` also works.
    ``vocab_size`` is the trained vocabulary's actual size (it can fall short of the requested size when the
    training text is too small to supply that many merges).
    """

    def __init__(self, tokenizer: object):
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError(f"BPETokenizer wraps a tokenizers.Tokenizer, got {type(tokenizer).__name__}; "
                            "use BPETokenizer.train(...) or BPETokenizer.load(path).")
        self._tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        serialized = tokenizer.to_str()
        self.fingerprint: str = "bpe-" + hashlib.sha256(serialized.encode("utf-8")).hexdigest()[:20]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts`` (an iterable of documents) to at most ``vocab_size`` ids.

        The 256 byte symbols and the separator are always in the vocabulary, so ``vocab_size`` must be ≥ 257.
        Training is deterministic: the same texts in the same order give the same tokenizer (and fingerprint).
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if isinstance(texts, str):
            raise TypeError("BPETokenizer.train expects an iterable of documents, got a single str; "
                            "pass [text] to train on one document.")
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"BPE vocab_size must be an int >= 257 (256 bytes + the document separator), "
                             f"got {vocab_size!r}.")
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[DOCUMENT_SEPARATOR],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load a tokenizer saved by :meth:`save` (a ``tokenizers`` JSON file)."""
        from tokenizers import Tokenizer as HFTokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"No tokenizer file at {os.fspath(path)!r}; save one with BPETokenizer.save(path).")
        return cls(HFTokenizer.from_file(os.fspath(path)))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as ``tokenizers`` JSON, atomically."""
        atomic_write_text(path, self._tokenizer.to_str(pretty=True))

    def encode(self, text: str) -> np.ndarray:
        """Text → int64 ids of shape ``(n_tokens,)``; no special tokens are added."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode expects str, got {type(text).__name__}.")
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many documents at once (in parallel threads); element i equals ``encode(texts[i])``."""
        return [np.asarray(enc.ids, dtype=np.int64) for enc in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids (shape ``(n,)``, each in ``[0, vocab_size)``) → text, keeping the separator token as its character."""
        return self._tokenizer.decode(decodable_ids(ids, "BPETokenizer", self.vocab_size), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"
