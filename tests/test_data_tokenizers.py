"""Tokenizers: byte round-trips, BPE round-trips/determinism/compression/persistence, separator handling."""

from __future__ import annotations

import random

import numpy as np
import pytest

from effml.data import BPETokenizer, ByteTokenizer, Tokenizer
from effml.data.corpora import CORPORA
from effml.data.tokenizers import DOCUMENT_SEPARATOR, token_dtype


def random_unicode(rng: random.Random, length: int) -> str:
    """Random valid Unicode text mixing ASCII, Latin-1, CJK, astral symbols and control characters."""
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


UNICODE_SAMPLES = ["", "hello", "naïve café", "日本語のテキスト", "emoji 🤖🎉 and \u0301 combining",
                   "nul\x00 and \x1c separator", "tabs\tand\r\nnewlines\n"]


@pytest.fixture(scope="module")
def code_texts() -> list[str]:
    """A few hundred kB of standard-library code: training texts for BPE (sorted files, deterministic)."""
    corpus = CORPORA["stdlib-code"]
    files = [f for f in corpus.files() if "/" not in f][:40]
    return [corpus.read(f) for f in files]


@pytest.fixture(scope="module")
def bpe(code_texts: list[str]) -> BPETokenizer:
    return BPETokenizer.train(code_texts[:-5], vocab_size=600)


def test_byte_tokenizer_matches_utf8_and_round_trips_arbitrary_unicode():
    tokenizer = ByteTokenizer()
    rng = random.Random(0)
    for text in UNICODE_SAMPLES + [random_unicode(rng, 200) for _ in range(20)]:
        ids = tokenizer.encode(text)
        assert ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer)
        assert ids.tolist() == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids.tolist()) == text


def test_byte_tokenizer_decodes_invalid_utf8_with_replacement_and_rejects_bad_ids():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    with pytest.raises(ValueError, match="256"):
        tokenizer.decode([300])
    with pytest.raises(TypeError):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_tokenizers_satisfy_protocol(bpe: BPETokenizer):
    for tokenizer in (ByteTokenizer(), bpe):
        assert isinstance(tokenizer, Tokenizer)
        assert isinstance(tokenizer.fingerprint, str) and tokenizer.fingerprint


def test_bpe_round_trips_code_and_arbitrary_unicode(bpe: BPETokenizer, code_texts: list[str]):
    rng = random.Random(1)
    for text in code_texts[-5:] + UNICODE_SAMPLES + [random_unicode(rng, 300) for _ in range(10)]:
        ids = bpe.encode(text)
        assert ids.ndim == 1
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < bpe.vocab_size)
        assert bpe.decode(ids) == text


def test_bpe_vocab_size_and_compression_on_held_out_code(bpe: BPETokenizer, code_texts: list[str]):
    assert 257 < bpe.vocab_size <= 600
    held_out = "\n".join(code_texts[-5:])
    assert len(bpe.encode(held_out)) < len(held_out.encode("utf-8"))


def test_bpe_training_is_deterministic(bpe: BPETokenizer, code_texts: list[str]):
    again = BPETokenizer.train(code_texts[:-5], vocab_size=600)
    assert again.fingerprint == bpe.fingerprint
    sample = code_texts[-1]
    np.testing.assert_array_equal(again.encode(sample), bpe.encode(sample))
    different = BPETokenizer.train(code_texts[:10], vocab_size=600)
    assert different.fingerprint != bpe.fingerprint


def test_bpe_save_load_preserves_mapping(tmp_path, bpe: BPETokenizer, code_texts: list[str]):
    path = tmp_path / "sub" / "bpe.json"
    bpe.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.fingerprint == bpe.fingerprint and loaded.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(loaded.encode(code_texts[-2]), bpe.encode(code_texts[-2]))
    assert [p.name for p in path.parent.iterdir()] == ["bpe.json"]  # no temp file left behind
    with pytest.raises(FileNotFoundError):
        BPETokenizer.load(tmp_path / "missing.json")


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_joined_documents_tokenize_as_documents_joined_by_separator(which: str, bpe: BPETokenizer):
    tokenizer = ByteTokenizer() if which == "byte" else bpe
    first, second = "def f(x):\n    return x  \n", "  \nclass A:\n    pass\n"
    separator = tokenizer.encode(DOCUMENT_SEPARATOR)
    assert len(separator) == 1
    expected = np.concatenate([tokenizer.encode(first), separator, tokenizer.encode(second)])
    np.testing.assert_array_equal(tokenizer.encode(first + DOCUMENT_SEPARATOR + second), expected)


def test_bpe_never_merges_across_the_separator_even_when_trained_on_it():
    # ")<SEP>v" occurs hundreds of times: a plain byte-level BPE would learn merges across the separator.
    training = [DOCUMENT_SEPARATOR.join(f"value({i})" for i in range(500))]
    tokenizer = BPETokenizer.train(training, vocab_size=300)
    first, second = "value(7)", "value(8)"
    separator = tokenizer.encode(DOCUMENT_SEPARATOR)
    assert len(separator) == 1
    expected = np.concatenate([tokenizer.encode(first), separator, tokenizer.encode(second)])
    np.testing.assert_array_equal(tokenizer.encode(first + DOCUMENT_SEPARATOR + second), expected)
    assert tokenizer.decode(expected) == first + DOCUMENT_SEPARATOR + second


def test_bpe_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="257"):
        BPETokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(TypeError, match="iterable of documents"):
        BPETokenizer.train("a single string", vocab_size=300)
    with pytest.raises(TypeError):
        BPETokenizer("not a tokenizer")


def test_token_dtype_is_smallest_unsigned_type_holding_all_ids():
    for vocab_size in (1, 2, 255, 256, 257, 65535, 65536, 65537, 2**20):
        dtype = token_dtype(vocab_size)
        assert np.iinfo(dtype).max >= vocab_size - 1
        smaller = {np.dtype(np.uint16): np.uint8, np.dtype(np.uint32): np.uint16}.get(dtype)
        assert smaller is None or np.iinfo(smaller).max < vocab_size - 1
    with pytest.raises(ValueError):
        token_dtype(0)


def test_decoding_an_id_outside_the_vocabulary_names_it_and_the_vocabulary_size(bpe: BPETokenizer):
    """BPETokenizer.decode dropped an unknown id silently (decode([V]) was '')."""
    size = bpe.vocab_size
    assert bpe.decode([size - 1]) == bpe.decode(np.array([size - 1]))  # the last id is in the vocabulary
    for ids in ([size], [0, size + 5], [-1]):
        with pytest.raises(ValueError, match=rf"BPETokenizer.decode: id {ids[-1]} is outside the vocabulary of "
                                             rf"{size} ids \(valid ids are 0..{size - 1}\)"):
            bpe.decode(ids)
    with pytest.raises(ValueError, match=r"ByteTokenizer.decode: id 300 \(and 1 more\) is outside the vocabulary of "
                                         r"256 ids"):
        ByteTokenizer().decode([97, 300, -2])


def test_a_hugging_face_tokenizer_refuses_to_decode_ids_outside_its_vocabulary(bpe: BPETokenizer):
    """HFTokenizer (effml.nn.pretrained) checks ids as effml's own tokenizers do, instead of leaving an unknown id to
    the wrapped tokenizer (which may drop it silently)."""
    transformers = pytest.importorskip("transformers")
    from effml.nn.pretrained import HFTokenizer

    wrapped = HFTokenizer(transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer), "test-bpe")
    ids = bpe.encode("def f(x):\n    return x\n")
    assert wrapped.decode(ids) == bpe.decode(ids)
    with pytest.raises(ValueError, match=rf"HFTokenizer.decode: id {wrapped.vocab_size} is outside the vocabulary"):
        wrapped.decode([*ids, wrapped.vocab_size])
