"""Docstring examples: exact literal text, the corpus's split by file, byte bounds, dedupe/exclude, the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from effml.data.corpora import CORPORA, SPLITS, TextFilesCorpus, assign_splits
from effml.data.docstrings import docstring_examples, load_docstrings

FRACTIONS = (0.4, 0.3, 0.3)
ACCENTED = "é" * 10 + '"""'  # 13 characters, 23 UTF-8 bytes

# Every kind of docstring the rule takes or skips. Not a raw string: "\\" below is one backslash in the file.
FEATURES = '''\
"""Module docstring: never an example."""


def f():
    """Hello.

    More.
    """
    return 1


async def fetch():
    """Async ✓ docstring."""


class Widget:
    """Class docstring."""

    def method(self):
        """Method at indentation 8.
        Second line.
        """

        def inner():
            """Nested function."""
        return inner


def single():
    \'\'\'Single quotes: skipped.\'\'\'


def raw():
    r"""Raw: skipped \\d."""


def not_first():
    x = 1
    """Not the first statement: not a docstring."""


def concatenated():
    """Implicit """ "concatenation: skipped."


def quoted():
    """Escaped \\""" quotes."""


def again():
    """Hello.

    More.
    """


def long():
    """''' + "x" * 300 + '''"""


def accented():
    """''' + ACCENTED + '''


try:
    import no_such_module
except ImportError:
    def fallback():
        """In an except handler."""

match 1:
    case 1:
        class InCase:
            """In a match case."""
'''

FEATURE_EXAMPLES = [  # in source order, the duplicate in again() and the 303-byte one in long() dropped
    'Hello.\n\n    More.\n    """',
    'Async ✓ docstring."""',
    'Class docstring."""',
    'Method at indentation 8.\n        Second line.\n        """',
    'Nested function."""',
    'Escaped \\""" quotes."""',
    ACCENTED,
    'In an except handler."""',
    'In a match case."""',
]
N_FEATURE_DOCSTRINGS = 14  # every class/function docstring in FEATURES, including the three skipped literals
N_MODULES = 9


class CountingCorpus(TextFilesCorpus):
    """A TextFilesCorpus that counts its file reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, patterns=("*.py",))
        self.reads = 0

    def read(self, file: str) -> str:
        self.reads += 1
        return super().read(file)


def module_text(index: int) -> str:
    return (f'def own{index}():\n    """Docstring of mod{index}."""\n\n\n'
            'def common():\n    """Shared by every module."""\n')


@pytest.fixture
def corpus(tmp_path: Path) -> CountingCorpus:
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    (root / "features.py").write_text(FEATURES, encoding="utf-8")
    (root / "broken.py").write_text('def f(:\n    """Never an example."""\n', encoding="utf-8")
    (root / "nul.py").write_text('def f():\n    """Null \x00 byte, never an example."""\n', encoding="utf-8")
    (root / "notes.txt").write_text('def f():\n    """Not a .py file."""\n', encoding="utf-8")
    for index in range(N_MODULES):
        (root / ("pkg" if index % 2 else "") / f"mod{index}.py").write_text(module_text(index), encoding="utf-8")
    return CountingCorpus(root)


def split_of(corpus: TextFilesCorpus, file: str) -> str:
    return next(split for split, files in assign_splits(corpus.files(), FRACTIONS).items() if file in files)


def load(corpus: TextFilesCorpus, split: str, tmp_path: Path, **kwargs):
    return load_docstrings(corpus, split, split_fractions=FRACTIONS, cache_dir=tmp_path / "cache", **kwargs)


def test_examples_are_the_exact_text_after_the_opening_quotes(corpus, tmp_path):
    split = split_of(corpus, "features.py")
    loaded = load(corpus, split, tmp_path, min_bytes=1)
    assert [e for e, f in zip(loaded.examples, loaded.files, strict=True) if f == "features.py"] == FEATURE_EXAMPLES
    n_modules = sum(f.startswith(("mod", "pkg/mod")) for f in assign_splits(corpus.files(), FRACTIONS)[split])
    assert loaded.n_docstrings == N_FEATURE_DOCSTRINGS + 2 * n_modules
    assert loaded.n_plain == loaded.n_docstrings - 3  # single quotes, r prefix, implicit concatenation
    # Each example is what follows a plain """ in the file, which is what a byte LM continues.
    assert all(f'"""{example}' in FEATURES for example in FEATURE_EXAMPLES)
    assert docstring_examples(corpus, split, min_bytes=1, split_fractions=FRACTIONS,
                              cache_dir=tmp_path / "cache") == loaded.examples


def test_each_split_takes_only_its_own_files_and_keeps_first_duplicates(corpus, tmp_path):
    groups = assign_splits(corpus.files(), FRACTIONS)
    assert all(any(f.endswith(".py") and "mod" in f for f in groups[split]) for split in SPLITS)
    for split in SPLITS:
        loaded = load(corpus, split, tmp_path)
        assert loaded.n_files == len(groups[split])
        assert set(loaded.files) <= set(groups[split])
        expected: list[tuple[str, str]] = []
        for file in groups[split]:
            if "mod" in file:
                index = int(Path(file).stem[len("mod"):])
                expected.append((f'Docstring of mod{index}."""', file))
                if len(expected) == 1:  # the shared docstring is kept once, from the split's first module
                    expected.append(('Shared by every module."""', file))
        module_pairs = [(e, f) for e, f in zip(loaded.examples, loaded.files, strict=True) if "mod" in f]
        assert module_pairs == expected


def test_byte_bounds_count_utf8_bytes_not_characters(corpus, tmp_path):
    split = split_of(corpus, "features.py")
    assert (len(ACCENTED), len(ACCENTED.encode("utf-8"))) == (13, 23)
    assert ACCENTED in load(corpus, split, tmp_path, min_bytes=23).examples
    assert ACCENTED not in load(corpus, split, tmp_path, min_bytes=24).examples
    assert ACCENTED in load(corpus, split, tmp_path, min_bytes=1, max_bytes=23).examples
    assert ACCENTED not in load(corpus, split, tmp_path, min_bytes=1, max_bytes=22).examples
    loaded = load(corpus, split, tmp_path, min_bytes=20, max_bytes=30)
    assert loaded.examples and all(20 <= len(e.encode("utf-8")) <= 30 for e in loaded.examples)
    long_example = "x" * 300 + '"""'
    assert long_example not in load(corpus, split, tmp_path).examples
    assert long_example in load(corpus, split, tmp_path, max_bytes=303).examples
    assert load(corpus, split, tmp_path, min_bytes=10_000, max_bytes=10_000).examples == []


def test_exclude_drops_texts_and_their_files(corpus, tmp_path):
    split = split_of(corpus, "features.py")
    full = load(corpus, split, tmp_path, min_bytes=1)
    dropped = {FEATURE_EXAMPLES[0], ACCENTED, "not an example at all"}
    kept = load(corpus, split, tmp_path, min_bytes=1, exclude=dropped)
    pairs = [(e, f) for e, f in zip(full.examples, full.files, strict=True) if e not in dropped]
    assert list(zip(kept.examples, kept.files, strict=True)) == pairs
    assert len(kept.examples) == len(full.examples) - 2
    assert kept.n_in_range == full.n_in_range  # counts describe the cached split, before exclude


def test_unparsable_files_are_skipped_and_counted(corpus, tmp_path):
    loaded = [load(corpus, split, tmp_path, min_bytes=1) for split in SPLITS]
    assert sorted(f for part in loaded for f in part.unparsable_files) == ["broken.py", "nul.py"]
    assert not any("never an example" in e.lower() or "Not a .py" in e for part in loaded for e in part.examples)


def test_second_call_is_served_from_the_cache_until_a_file_changes(corpus, tmp_path):
    split = split_of(corpus, "features.py")
    first = load(corpus, split, tmp_path)
    assert corpus.reads == first.n_files > 0
    assert len(list((tmp_path / "cache" / "docstrings").iterdir())) == 1
    corpus.reads = 0
    assert load(corpus, split, tmp_path) == first
    assert load(corpus, split, tmp_path, exclude={first.examples[0]}).examples == first.examples[1:]
    assert corpus.reads == 0
    # Same size, new content and mtime: the entry's key changes and the split is read again.
    module = next(f for f in assign_splits(corpus.files(), FRACTIONS)[split] if "mod" in f)
    path = corpus.root / module
    old_text, old_mtime = path.read_text(encoding="utf-8"), path.stat().st_mtime_ns
    path.write_text(old_text.replace("Docstring of", "DOCSTRING OF"), encoding="utf-8")
    os.utime(path, ns=(old_mtime + 10**9, old_mtime + 10**9))
    changed = load(corpus, split, tmp_path)
    assert corpus.reads == first.n_files
    stem = Path(module).stem
    assert f'DOCSTRING OF {stem}."""' in changed.examples and f'Docstring of {stem}."""' not in changed.examples


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "dev"}, r"Unknown split 'dev'"),
    ({"min_bytes": 0}, r"min_bytes must be a positive int.*got 0"),
    ({"max_bytes": -5}, r"max_bytes must be a positive int.*got -5"),
    ({"min_bytes": True}, r"min_bytes must be a positive int.*got True"),
    ({"max_bytes": 8.5}, r"max_bytes must be a positive int.*got 8.5"),
    ({"min_bytes": 100, "max_bytes": 99}, r"min_bytes=100 is larger than max_bytes=99.*min_bytes <= max_bytes"),
    ({"split_fractions": (0.5, 0.5)}, r"split_fractions must be three positive numbers"),
    ({"exclude": 'Hello."""'}, r"exclude must be a collection.*got the single str"),
    ({"source": "no-such-corpus"}, r"Unknown corpus 'no-such-corpus'"),
])
def test_bad_arguments_raise_clear_errors(corpus, tmp_path, kwargs, message):
    arguments = {"source": corpus, "split": "train", "cache_dir": tmp_path / "cache", **kwargs}
    with pytest.raises(ValueError, match=message):
        load_docstrings(**arguments)
    assert corpus.reads == 0 and not (tmp_path / "cache").exists()


def test_stdlib_code_train_and_held_out_docstrings(tmp_path):
    source = CORPORA["stdlib-code"]
    groups = assign_splits(source.files())
    train = load_docstrings("stdlib-code", "train", cache_dir=tmp_path)
    test = load_docstrings("stdlib-code", "test", cache_dir=tmp_path, exclude=set(train.examples))
    assert len(train.examples) > 1000 and len(test.examples) > 50
    assert set(train.files) <= set(groups["train"]) and set(test.files) <= set(groups["test"])
    assert not set(train.examples) & set(test.examples)
    for example, file in zip(test.examples, test.files, strict=True):
        assert 16 <= len(example.encode("utf-8")) <= 256 and example.endswith('"""')
        assert f'"""{example}' in source.read(file)
