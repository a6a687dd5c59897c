"""Python docstrings from a code corpus, split by file like the corpus: a small target set for synthetic data.

The consumer is the SoftSRV recipe (arXiv 2410.16534): soft prompts steer a frozen language model to generate
synthetic data resembling a *target* set, here the docstrings of the CPython standard library
(``"stdlib-code"``, see :mod:`effml.data.corpora`).

**What an example is.** For every function, async function and class (at any nesting depth; module docstrings
are not taken) whose docstring literal is written exactly as ``\"\"\"...\"\"\"`` — no string prefix such as
``r``/``u``/``b``, not ``'''``, and one literal rather than an implicit concatenation — the example is the
literal's source text *after* the opening quotes, **including the closing quotes**: exactly the characters that
follow the opening ``\"\"\"`` in the file, continuation lines keeping their original indentation (so a
docstring whose closing quotes sit on their own line ends with ``\\n``, that line's indentation and the quotes).
For instance, from

.. code-block:: python

    def f():
        \"\"\"Hello.

        More.
        \"\"\"

the example is ``'Hello.\\n\\n    More.\\n    \"\"\"'``. Why this format: a byte-level LM pretrained on the code
sees a docstring as exactly this continuation of ``\"\"\"``, so a generator prompted with ``\"\"\"`` produces
samples comparable with the targets once they are cut at their first closing ``\"\"\"``. The file text is the
corpus's (:meth:`~effml.data.corpora.CorpusSource.read`: UTF-8, newlines normalised to ``\\n``); files that
do not parse with :mod:`ast` are skipped and counted.

**Selection.** Examples whose UTF-8 length (closing quotes included) lies in ``[min_bytes, max_bytes]`` are
kept; exact duplicates within a split keep their first occurrence (files in split order, docstrings in source
order within a file); ``exclude`` then removes given texts, e.g. ``exclude=set(train)`` for a held-out set that
shares no text with the training examples.

**Split rule.** A split's docstrings come only from the files that
:func:`~effml.data.corpora.assign_splits` puts in that split — the same files
:func:`~effml.data.corpora.load_corpus` uses — so an LM pretrained on the corpus's train split never saw the
file of a held-out docstring.

**Cache.** Each split's examples are cached under ``<cache_dir>/docstrings/`` (``cache_dir`` defaults to
:func:`effml.data.cache.default_cache_dir`) as one uint8 array of the examples' concatenated UTF-8 bytes, an
int64 array of boundaries and an int32 array of source-file indices; the key hashes the source identity, every
file's path, size and mtime, the split, ``split_fractions``, ``min_bytes``/``max_bytes`` and a format version.
``exclude`` is applied after loading, so it is not part of the key. A cache hit reads no corpus file.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effml.data.cache import cache_key, default_cache_dir, entry_dir, load_entry, write_entry
from effml.data.corpora import SPLITS, CorpusSource, _check_fractions, assign_splits, resolve_corpus, source_state

__all__ = ["DocstringSet", "load_docstrings", "docstring_examples"]

_FORMAT_VERSION = 1  # bump when the extraction rule changes, so old cache entries miss
_QUOTES = b'"""'
# One plain triple-double-quoted literal, nothing after it: its first unescaped ``"""`` is its end.
_SINGLE_LITERAL = re.compile(rb'"""(?:[^"\\]|\\.|"(?!""))*"""', re.DOTALL)
_DOCUMENTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_BLOCK_FIELDS = ("body", "handlers", "orelse", "finalbody", "cases")  # fields of statements holding statements


@dataclass(frozen=True)
class DocstringSet:
    """The docstring examples of one split, with where they came from.

    Attributes:
        examples: the example texts (format in the module docstring), in split order.
        files: the corpus file of each example (same length as ``examples``).
        n_files: files in the split.
        unparsable_files: files of the split skipped because :func:`ast.parse` failed.
        n_docstrings: class/function docstrings found in the split's files, before any filter.
        n_plain: those written as one plain ``\"\"\"`` literal.
        n_in_range: those of ``n_plain`` within ``[min_bytes, max_bytes]`` (``examples`` are these without
            duplicates and without ``exclude``).
    """

    examples: list[str]
    files: list[str]
    n_files: int
    unparsable_files: list[str]
    n_docstrings: int
    n_plain: int
    n_in_range: int


def _line_starts(data: bytes) -> list[int]:
    """Byte offset of the start of each line (1-based line ``n`` starts at ``starts[n - 1]``)."""
    return [0, *(match.end() for match in re.finditer(rb"\r\n|\r|\n", data))]


def _statements(nodes: list[ast.AST]) -> Iterator[ast.AST]:
    """``nodes`` and, recursively, every node of their statement blocks, in source order: ``ast.walk`` without
    the expressions, where no class or function definition can occur, and several times faster."""
    for node in nodes:
        yield node
        for field in _BLOCK_FIELDS:  # except handlers and match cases come out too; they hold blocks themselves
            yield from _statements(getattr(node, field, ()))


def _file_docstrings(text: str) -> tuple[int, list[bytes]] | None:
    """The number of class/function docstrings in ``text`` and the examples among them, in source order.

    An example is the UTF-8 source after the opening quotes of a plain triple-double-quoted literal, closing
    quotes included. None when the text does not parse.
    """
    try:
        with warnings.catch_warnings():  # invalid escape sequences etc. in foreign code are not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    literals = [node.body[0].value for node in _statements(tree.body)
                if isinstance(node, _DOCUMENTED) and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)]
    literals.sort(key=lambda literal: (literal.lineno, literal.col_offset))
    data = text.encode("utf-8")
    starts = _line_starts(data)
    plain: list[bytes] = []
    for literal in literals:  # ast offsets are UTF-8 byte columns
        segment = data[starts[literal.lineno - 1] + literal.col_offset:
                       starts[literal.end_lineno - 1] + literal.end_col_offset]
        if _SINGLE_LITERAL.fullmatch(segment):
            plain.append(segment[len(_QUOTES):])
    return len(literals), plain


def _check_arguments(split: str, min_bytes: int, max_bytes: int, exclude: Collection[str]) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    for label, value in (("min_bytes", min_bytes), ("max_bytes", max_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive int (UTF-8 bytes of an example, closing quotes "
                             f"included), got {value!r}.")
    if min_bytes > max_bytes:
        raise ValueError(f"min_bytes={min_bytes} is larger than max_bytes={max_bytes}, so no example could be "
                         "kept; pass min_bytes <= max_bytes.")
    if isinstance(exclude, (str, bytes)):
        raise ValueError(f"exclude must be a collection of example texts (e.g. a set), got the single "
                         f"{type(exclude).__name__} {exclude[:40]!r}; wrap it as {{text}}.")


def _build(source: CorpusSource, files: Sequence[str], min_bytes: int, max_bytes: int
           ) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Extract the examples of ``files`` into cache arrays and metadata."""
    examples: list[bytes] = []
    file_index: list[int] = []
    seen: set[bytes] = set()
    unparsable: list[str] = []
    n_docstrings = n_plain = n_in_range = 0
    for index, file in enumerate(files):
        found = _file_docstrings(source.read(file))
        if found is None:
            unparsable.append(file)
            continue
        n_docstrings += found[0]
        n_plain += len(found[1])
        for example in found[1]:
            if not min_bytes <= len(example) <= max_bytes:
                continue
            n_in_range += 1
            if example not in seen:
                seen.add(example)
                examples.append(example)
                file_index.append(index)
    arrays = {
        "text": np.frombuffer(b"".join(examples), dtype=np.uint8),
        "offsets": np.cumsum([0, *map(len, examples)], dtype=np.int64),
        "file_index": np.asarray(file_index, dtype=np.int32),
    }
    meta = {"files": list(files), "unparsable_files": unparsable, "n_docstrings": n_docstrings,
            "n_plain": n_plain, "n_in_range": n_in_range}
    return arrays, meta


def load_docstrings(source: str | CorpusSource = "stdlib-code", split: str = "train", *, min_bytes: int = 16,
                    max_bytes: int = 256, split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                    exclude: Collection[str] = (), cache_dir: str | os.PathLike[str] | None = None
                    ) -> DocstringSet:
    """The docstring examples of one split with their source files and counts, through the on-disk cache.

    Args:
        source: a corpus name (see :func:`~effml.data.corpora.resolve_corpus`) or a ``CorpusSource``.
        split: ``"train"``, ``"valid"`` or ``"test"``; examples come only from that split's files.
        min_bytes, max_bytes: inclusive bounds on an example's UTF-8 length, closing quotes included.
        split_fractions: (train, valid, test) as for :func:`~effml.data.corpora.load_corpus`.
        exclude: texts to drop after loading (not part of the cache key), e.g. ``set(train_examples)``.
        cache_dir: cache root (entries go in ``<cache_dir>/docstrings/``); default ``$EFFML_CACHE`` or
            ``~/.cache/effml``.
    """
    _check_arguments(split, min_bytes, max_bytes, exclude)
    fractions = _check_fractions(split_fractions)
    source = resolve_corpus(source)
    files = source.files()
    key = cache_key({
        "version": _FORMAT_VERSION,
        **source_state(source, files),
        "split": split,
        "split_fractions": list(fractions),
        "min_bytes": min_bytes,
        "max_bytes": max_bytes,
    })
    directory = entry_dir(Path(cache_dir if cache_dir is not None else default_cache_dir()) / "docstrings",
                          f"{source.name}-{split}", key)
    loaded = load_entry(directory, key)
    if loaded is None:
        write_entry(directory, key, *_build(source, assign_splits(files, fractions)[split], min_bytes, max_bytes))
        loaded = load_entry(directory, key)
        if loaded is None:
            raise OSError(f"The docstring cache entry just written to {directory} could not be read back; check "
                          "that the cache directory is on a working local filesystem or set EFFML_CACHE elsewhere.")
    arrays, meta = loaded
    data = bytes(arrays["text"])
    offsets = arrays["offsets"].tolist()
    split_files = meta["files"]
    excluded = set(exclude)
    kept = [(text, split_files[index])
            for start, end, index in zip(offsets[:-1], offsets[1:], arrays["file_index"].tolist(), strict=True)
            if (text := data[start:end].decode("utf-8")) not in excluded]
    return DocstringSet(examples=[text for text, _ in kept], files=[file for _, file in kept],
                        n_files=len(split_files), unparsable_files=list(meta["unparsable_files"]),
                        n_docstrings=meta["n_docstrings"], n_plain=meta["n_plain"], n_in_range=meta["n_in_range"])


def docstring_examples(source: str | CorpusSource = "stdlib-code", split: str = "train", *, min_bytes: int = 16,
                       max_bytes: int = 256, split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                       exclude: Collection[str] = (), cache_dir: str | os.PathLike[str] | None = None
                       ) -> list[str]:
    """Just the example texts of :func:`load_docstrings` (same arguments), e.g. a SoftSRV target set::

        train = docstring_examples("stdlib-code", "train")
        held_out = docstring_examples("stdlib-code", "test", exclude=set(train))
    """
    return load_docstrings(source, split, min_bytes=min_bytes, max_bytes=max_bytes,
                           split_fractions=split_fractions, exclude=exclude, cache_dir=cache_dir).examples
