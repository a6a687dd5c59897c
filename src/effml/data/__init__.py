"""Data: tokenizers, offline corpora with a memory-mapped token cache, LM batch sources, synthetic tasks.

``effml.data.tasks`` holds the synthetic tasks; it is imported with this package.
"""

from effml.data import tasks
from effml.data.batches import WindowBatches, eval_window_starts, eval_windows
from effml.data.corpora import (CORPORA, CorpusSource, CorpusSplits, CorpusUnavailableError, TextFilesCorpus,
                                assign_splits, load_corpus, read_split, resolve_corpus)
from effml.data.docstrings import DocstringSet, docstring_examples, load_docstrings
from effml.data.parallel_text import ParallelVerses, VersePair, VerseRef, load_parallel_verses
from effml.data.tokenizers import DOCUMENT_SEPARATOR, BPETokenizer, ByteTokenizer, Tokenizer, token_dtype

__all__ = [
    "Tokenizer", "ByteTokenizer", "BPETokenizer", "DOCUMENT_SEPARATOR", "token_dtype",
    "CORPORA", "CorpusSource", "TextFilesCorpus", "CorpusUnavailableError", "CorpusSplits",
    "load_corpus", "read_split", "resolve_corpus", "assign_splits",
    "WindowBatches", "eval_windows", "eval_window_starts",
    "DocstringSet", "docstring_examples", "load_docstrings",
    "ParallelVerses", "VersePair", "VerseRef", "load_parallel_verses",
    "tasks",
]
