"""Verse-aligned parallel Bible text read straight from SWORD zText modules, for machine-translation recipes.

The sources are the public-domain Bibles that Debian packages as SWORD modules (see ``shared/DATA.md``):
``sword-text-kjv`` (King James Version, module ``engKJV2006eb``, abbreviation ``KJV``), ``sword-text-web`` (World
English Bible, ``engWEB2015eb``/``WEB``) and ``sword-text-sparv`` (Reina-Valera 1909, ``spaRV1909eb``/``RV1909``).
:func:`load_parallel_verses` pairs two of them verse by verse (KJV→WEB: archaic→modern English; KJV→RV1909:
English→Spanish) and :meth:`ParallelVerses.split_by_book` splits the pairs by book, so train, valid and test
never share a book (nor, a fortiori, a verse). The files are read with :mod:`struct` and :mod:`zlib`;
neither libsword nor pysword is used.

**Module library.** A SWORD library root (``root=``, else ``$SWORD_PATH``, else ``/usr/share/sword``) holds
``mods.d/*.conf``, one INI-like file per module: ``[ModuleName]`` then ``Key=Value`` lines (a trailing ``\\``
continues a value; keys may repeat). Used keys: ``DataPath`` (the module's directory, relative to the root),
``ModDrv`` (only ``zText`` is read), ``CompressType`` (``ZIP`` = zlib, the default; ``BZIP2`` and ``XZ`` also
work), ``SourceType`` (markup: ``OSIS``, ``ThML`` or ``Plaintext``, the default), ``Encoding`` (``UTF-8``, else
Latin-1), ``Versification`` (default ``KJV``; ``NRSVA`` is also known) and ``CipherKey`` (locked modules are
refused). A module is named, case-insensitively, by its section name, its ``Abbreviation`` or an ``Obsoletes``
name: ``"kjv"``, ``"KJV"`` and ``"engKJV2006eb"`` are the same module.

**zText files.** Each testament (``ot``, ``nt``) has three files in the module directory:

- ``<t>.bzv``: the verse index, one 10-byte little-endian record ``<IIH`` (block number, byte offset inside the
  decompressed block, byte size) per *index entry*; size 0 means the entry is empty.
- ``<t>.bzs``: the block index, one 12-byte record ``<III`` (offset in ``.bzz``, compressed size, decompressed
  size) per block.
- ``<t>.bzz``: the compressed blocks, concatenated (the Debian modules hold one block per book).

**Which index entry is which verse.** A testament's entries follow its versification's book list: entry 0 is the
module heading, entry 1 the testament heading, then for every book one book-heading entry followed, for every
chapter, by one chapter-heading entry and one entry per verse. So the KJV Old Testament has 2 + 39 books + 929
chapters + 23,145 verses = 24,115 entries (Genesis 1:1 is entry 4) and the New Testament 2 + 27 + 260 + 7,957 =
8,246 (Matthew 1:1 is entry 4), exactly the sizes of the KJV and RV1909 ``.bzv`` files. The entry count of each
file must equal the versification's, else the module is refused. In OSIS modules a chapter-heading entry holds
the ``<chapter sID=… osisID="Book.N"/>`` milestone, and each one present is checked against the expected book
and chapter. Heading entries are never returned (they hold book titles, introductions and, in WEB's Hosea book
heading, the whole Greek Daniel, which NRSVA has no place for).

**Versification tables.** ``_KJV_OT``/``_KJV_NT`` below list each book's OSIS ID and its verses per chapter. They
were generated once from the installed ``engKJV2006eb`` module (Debian ``sword-text-kjv`` 14.3) by reading every
chapter-heading entry's ``osisID`` and counting the entries up to the next heading; ``spaRV1909eb`` gives the
same table. ``NRSVA`` (the WEB module's versification) is KJV's 66 books with 3 John 1 holding 15 verses and
Revelation 12 holding 18, plus 17 deuterocanonical books after Malachi in the Old Testament (``_DEUTEROCANON``).
That table comes from the key list of ``mod2imp engWEB2015eb`` (Debian ``libsword-utils``: libsword's own NRSVA
table), because the module (426.0) has no chapter headings for Greek Esther 11-16 and leaves the Prayer of
Azariah, Susanna and Bel empty; its other chapter headings agree with it. The KJV table equals ``mod2imp``'s too,
and every entry of the three modules was checked against ``mod2imp``'s keys and texts. The tables are structural
facts about public-domain texts.

**Text.** Verse entries hold marked-up text. For OSIS and ThML the text is cut at the end-of-book ``<div>`` (WEB
appends its glossary to Revelation 22:21), notes (``<note>…</note>``, footnotes and cross references) and
non-canonical titles (section heads, the acrostic letters of Psalm 119) are removed with their content, and every
other tag (Strong's ``<w lemma=…>``, ``<transChange>``, ``<divineName>``, ``<q>``, milestones, line groups) is
removed keeping its content, so canonical psalm superscriptions stay, as part of verse 1 in all three modules.
Where a removed note stood between a word or punctuation and a following word or opening quote, a space
takes its place. Then entities are decoded, stray USFM markers
(``\\nd``, left in 27 KJV verses) and KJV's paragraph signs ``¶`` are dropped, whitespace runs become one space,
a space before ``, . ; : ? !`` is dropped, and the ends are stripped.

**Pairs.** A pair is a reference (:class:`VerseRef`: OSIS book ID, chapter, verse) that both modules'
versification tables contain and whose cleaned text is non-empty in both, in the source's canonical order.
Non-empty verses without a partner are listed in :attr:`ParallelVerses.source_only` and
:attr:`ParallelVerses.target_only`. What the real modules give (Debian bookworm packages):

- KJV↔WEB: 31,095 pairs. WEB follows KJV numbering inside its NRSVA index (it leaves NRSVA's 3 John 1:15 and
  Revelation 12:18 empty), omits Luke 17:36, Acts 8:37, 15:34 and 24:7 (source-only), and puts Romans 16:25-27
  at the end of its 14:23, so that pair's target is longer. Its 6,362 deuterocanonical verses are target-only.
- KJV↔RV1909: 31,084 pairs, but RV1909's source numbers some chapters the Hebrew/Spanish way, and its module
  squeezes them into KJV's slots: in Numbers 12-13 and 29-30, 1 Samuel 23-24, 2 Samuel 20, 2 Chronicles 33,
  Job 35 and 38-40, Hosea 11-12, Jonah 1-2, Acts 19 and 2 Corinthians 13 verses are shifted or merged (RV1909
  Numbers 13:1 is KJV 12:16). :meth:`ParallelVerses.drop_gapped_chapters` removes those chapters, and the
  (aligned) chapters after 2 Samuel 20, 2 Chronicles 33, Job 35 and Acts 19: 568 pairs, 30,516 left.
- WEB keeps a few texts in chapter-heading entries, which are not verses and are dropped: the speaker labels of
  the Song of Songs, Sirach 51's title and three Greek Esther passages.

**Speed.** Loading KJV↔WEB takes about 2 s (one CPU core; mostly the markup regexes: WEB's verses alone are
29 MB with their Strong's tags), so there is no on-disk cache: load once and call :meth:`ParallelVerses.split_by_book`.
"""

from __future__ import annotations

import bz2
import html
import lzma
import os
import re
import struct
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, overload

from effml.data.corpora import CorpusUnavailableError

__all__ = [
    "DEFAULT_ROOT", "ROOT_ENV", "VALID_BOOKS", "TEST_BOOKS", "VERSIFICATIONS",
    "VerseRef", "VersePair", "ParallelVerses", "BookSplits", "SwordModule", "SwordModuleNotFoundError",
    "library_root", "installed_modules", "find_modules", "read_verses", "clean_markup", "load_parallel_verses",
]

DEFAULT_ROOT = Path("/usr/share/sword")
#: Environment variable naming the SWORD library root when ``root`` is not passed (libsword's own variable).
ROOT_ENV = "SWORD_PATH"

#: The default held-out books, one of each kind in each set (narrative, wisdom or poetry, prophet, gospel,
#: epistle). With KJV↔WEB: 1,754 valid and 1,752 test verse pairs; every other book is in train.
VALID_BOOKS = ("Josh", "Song", "Hos", "Mark", "Phil")
TEST_BOOKS = ("Ruth", "Eccl", "Amos", "Luke", "Gal")

# Debian packages of the modules named in shared/DATA.md, by lower-cased module name, abbreviation or alias.
_DEBIAN_PACKAGES = {
    "kjv": "sword-text-kjv", "engkjv2006eb": "sword-text-kjv",
    "web": "sword-text-web", "engweb2015eb": "sword-text-web",
    "rv1909": "sword-text-sparv", "sparv1909eb": "sword-text-sparv", "sparv": "sword-text-sparv",
}

# Versification tables (how they were made: module docstring). Each is "Book n1 n2 ...": an OSIS book ID, then
# the number of verses of each of its chapters.
_KJV_OT = """
Gen 31 25 24 26 32 22 24 22 29 32 32 20 18 24 21 16 27 33 38 18 34 24 20 67 34 35 46 22 35 43 55 32 20 31 29 43 36
30 23 23 57 38 34 34 28 34 31 22 33 26 Exod 22 25 22 31 23 30 25 32 35 29 10 51 22 31 27 36 16 27 25 26 36 31 33 18
40 37 21 43 46 38 18 35 23 35 35 38 29 31 43 38 Lev 17 16 17 35 19 30 38 36 24 20 47 8 59 57 33 34 16 30 37 27 24 33
44 23 55 46 34 Num 54 34 51 49 31 27 89 26 23 36 35 16 33 45 41 50 13 32 22 29 35 41 30 25 18 65 23 31 40 16 54 42
56 29 34 13 Deut 46 37 29 49 33 25 26 20 29 22 32 32 18 29 23 22 20 22 21 20 23 30 25 22 19 19 26 68 29 20 30 52 29
12 Josh 18 24 17 24 15 27 26 35 27 43 23 24 33 15 63 10 18 28 51 9 45 34 16 33 Judg 36 23 31 24 31 40 25 35 57 18 40
15 25 20 20 31 13 31 30 48 25 Ruth 22 23 18 22 1Sam 28 36 21 22 12 21 17 22 27 27 15 25 23 52 35 23 58 30 24 42 15
23 29 22 44 25 12 25 11 31 13 2Sam 27 32 39 12 25 23 29 18 13 19 27 31 39 33 37 23 29 33 43 26 22 51 39 25 1Kgs 53
46 28 34 18 38 51 66 28 29 43 33 34 31 34 34 24 46 21 43 29 53 2Kgs 18 25 27 44 27 33 20 29 37 36 21 21 25 29 38 20
41 37 37 21 26 20 37 20 30 1Chr 54 55 24 43 26 81 40 40 44 14 47 40 14 17 29 43 27 17 19 8 30 19 32 31 31 32 34 21
30 2Chr 17 18 17 22 14 42 22 18 31 19 23 16 22 15 19 14 19 34 11 37 20 12 21 27 28 23 9 27 36 27 21 33 25 33 27 23
Ezra 11 70 13 24 17 22 28 36 15 44 Neh 11 20 32 23 19 19 73 18 38 39 36 47 31 Esth 22 23 15 17 14 14 10 17 32 3 Job
22 13 26 21 27 30 21 22 35 22 20 25 28 22 35 22 16 21 29 29 34 30 17 25 6 14 23 28 25 31 40 22 33 37 16 33 24 41 30
24 34 17 Ps 6 12 8 8 12 10 17 9 20 18 7 8 6 7 5 11 15 50 14 9 13 31 6 10 22 12 14 9 11 12 24 11 22 22 28 12 40 22 13
17 13 11 5 26 17 11 9 14 20 23 19 9 6 7 23 13 11 11 17 12 8 12 11 10 13 20 7 35 36 5 24 20 28 23 10 12 20 72 13 19
16 8 18 12 13 17 7 18 52 17 16 15 5 23 11 13 12 9 9 5 8 28 22 35 45 48 43 13 31 7 10 10 9 8 18 19 2 29 176 7 8 9 4 8
5 6 5 6 8 8 3 18 3 3 21 26 9 8 24 13 10 7 12 15 21 10 20 14 9 6 Prov 33 22 35 27 23 35 27 36 18 32 31 28 25 35 33 33
28 24 29 30 31 29 35 34 28 28 27 28 27 33 31 Eccl 18 26 22 16 20 12 29 17 18 20 10 14 Song 17 17 11 16 16 13 13 14
Isa 31 22 26 6 30 13 25 22 21 34 16 6 22 32 9 14 14 7 25 6 17 25 18 23 12 21 13 29 24 33 9 20 24 17 10 22 38 22 8 31
29 25 28 28 25 13 15 22 26 11 23 15 12 17 13 12 21 14 21 22 11 12 19 12 25 24 Jer 19 37 25 31 31 30 34 22 26 25 23
17 27 22 21 21 27 23 15 18 14 30 40 10 38 24 22 17 32 24 40 44 26 22 19 32 21 28 18 16 18 22 13 30 5 28 7 47 39 46
64 34 Lam 22 22 66 22 22 Ezek 28 10 27 17 17 14 27 18 11 22 25 28 23 23 8 63 24 32 14 49 32 31 49 27 17 21 36 26 21
26 18 32 33 31 15 38 28 23 29 49 26 20 27 31 25 24 23 35 Dan 21 49 30 37 31 28 28 27 27 21 45 13 Hos 11 23 5 19 15
11 16 14 17 15 12 14 16 9 Joel 20 32 21 Amos 15 16 15 13 27 14 17 14 15 Obad 21 Jonah 17 10 10 11 Mic 16 13 12 13 15
16 20 Nah 15 13 19 Hab 17 20 19 Zeph 18 15 20 Hag 15 23 Zech 21 13 10 14 11 15 14 23 17 12 17 14 9 21 Mal 14 17 18 6
"""
_KJV_NT = """
Matt 25 23 17 25 48 34 29 34 38 42 30 50 58 36 39 28 27 35 30 34 46 46 39 51 46 75 66 20 Mark 45 28 35 41 43 56 37
38 50 52 33 44 37 72 47 20 Luke 80 52 38 44 39 49 50 56 62 42 54 59 35 35 32 31 37 43 48 47 38 71 56 53 John 51 25
36 54 47 71 53 59 41 42 57 50 38 31 27 33 26 40 42 31 25 Acts 26 47 26 37 42 15 60 40 43 48 30 25 52 28 41 40 34 28
41 38 40 30 35 27 27 32 44 31 Rom 32 29 31 25 21 23 25 39 33 21 36 21 14 23 33 27 1Cor 31 16 23 21 13 20 40 13 27 33
34 31 13 40 58 24 2Cor 24 17 18 18 21 18 16 24 15 18 33 21 14 Gal 24 21 29 31 26 18 Eph 23 22 21 32 33 24 Phil 30 30
21 23 Col 29 23 25 18 1Thess 10 20 13 18 28 2Thess 12 17 18 1Tim 20 15 16 16 25 21 2Tim 18 26 17 22 Titus 16 15 15
Phlm 25 Heb 14 18 19 16 14 20 28 13 28 39 40 29 25 Jas 27 26 18 17 20 1Pet 25 25 22 19 14 2Pet 21 22 18 1John 10 29
24 21 21 2John 13 3John 14 Jude 25 Rev 20 29 22 11 14 17 17 13 21 11 19 17 18 20 8 21 18 24 21 15 27 21
"""
_DEUTEROCANON = """
Tob 22 14 17 21 22 18 16 21 6 13 18 22 17 15 Jdt 16 28 10 15 24 21 32 36 14 23 23 20 20 19 14 25 EsthGr 22 23 15 17
14 14 10 17 32 13 12 6 18 19 16 24 Wis 16 24 19 20 23 25 30 21 18 21 26 27 19 31 19 29 21 25 22 Sir 30 18 31 31 15
37 36 19 18 31 34 18 26 27 20 30 32 33 30 31 28 27 27 34 26 29 30 26 28 25 31 24 33 31 26 31 31 34 35 30 22 25 33 23
26 20 25 25 16 29 30 Bar 22 35 37 37 9 73 PrAzar 68 Sus 64 Bel 42 1Macc 64 70 60 61 68 63 50 32 73 89 74 53 53 49 41
24 2Macc 36 32 40 50 27 31 42 36 29 38 38 45 26 46 39 1Esd 58 30 24 63 73 34 15 96 55 PrMan 15 AddPs 7 3Macc 29 33
30 21 51 41 23 2Esd 40 48 36 52 56 59 140 63 47 59 46 51 58 48 63 78 4Macc 35 24 21 26 38 35 23 29 32 21 27 19 27 20
32 25 24 24
"""
_NRSVA_NT_CHAPTERS = {("3John", 1): 15, ("Rev", 12): 18}  # NRSVA chapters whose verse count differs from KJV's

_Books = tuple[tuple[str, tuple[int, ...]], ...]  # ((OSIS book ID, verses of each chapter), ...) of a testament


def _parse_books(table: str) -> _Books:
    books: list[tuple[str, list[int]]] = []
    for token in table.split():
        if token.isdigit():
            books[-1][1].append(int(token))
        else:
            books.append((token, []))
    return tuple((book, tuple(chapters)) for book, chapters in books)


def _with_chapters(books: _Books, changes: dict[tuple[str, int], int]) -> _Books:
    return tuple((book, tuple(changes.get((book, number), verses) for number, verses in enumerate(chapters, 1)))
                 for book, chapters in books)


#: Versification name (upper case) → (Old Testament books, New Testament books), each a tuple of
#: ``(OSIS book ID, (verses in chapter 1, verses in chapter 2, ...))``.
VERSIFICATIONS: dict[str, tuple[_Books, _Books]] = {
    "KJV": (_parse_books(_KJV_OT), _parse_books(_KJV_NT)),
    "NRSVA": (_parse_books(_KJV_OT) + _parse_books(_DEUTEROCANON),
              _with_chapters(_parse_books(_KJV_NT), _NRSVA_NT_CHAPTERS)),
}
_KNOWN_BOOKS = frozenset(book for testaments in VERSIFICATIONS.values() for books in testaments for book, _ in books)
_TESTAMENTS = ("ot", "nt")


class VerseRef(NamedTuple):
    """A verse: OSIS book ID (``"Gen"``, ``"1Cor"``), chapter and verse, both from 1. ``str()`` gives ``Gen.1.1``."""

    book: str
    chapter: int
    verse: int

    def __str__(self) -> str:
        return f"{self.book}.{self.chapter}.{self.verse}"


class VersePair(NamedTuple):
    """One aligned verse: its reference and the cleaned source and target texts."""

    reference: VerseRef
    source: str
    target: str


class SwordModuleNotFoundError(CorpusUnavailableError):
    """A requested SWORD module is not installed; the message names it and the Debian package to install."""


@dataclass(frozen=True)
class SwordModule:
    """One installed SWORD module, described by its ``mods.d`` conf file (keys: module docstring)."""

    name: str
    conf: Path
    directory: Path
    abbreviation: str | None
    aliases: tuple[str, ...]
    description: str
    driver: str
    compression: str
    source_type: str
    encoding: str
    versification: str
    locked: bool

    @classmethod
    def from_conf(cls, conf: Path, root: Path) -> SwordModule:
        """Parse ``conf`` (a ``mods.d/*.conf`` file of the library at ``root``)."""
        name, fields = _parse_conf(conf)
        data_path = fields.get("datapath", [""])[0]
        return cls(
            name=name, conf=conf, directory=root / data_path,
            abbreviation=fields.get("abbreviation", [None])[0],
            aliases=tuple(fields.get("obsoletes", [])),
            description=fields.get("description", [""])[0],
            driver=fields.get("moddrv", [""])[0],
            compression=fields.get("compresstype", ["ZIP"])[0].upper(),
            source_type=fields.get("sourcetype", ["Plaintext"])[0],
            encoding="utf-8" if fields.get("encoding", [""])[0].upper() in ("UTF-8", "UTF8") else "latin-1",
            versification=fields.get("versification", ["KJV"])[0].upper(),
            locked=bool(fields.get("cipherkey", [""])[0]),
        )

    def label(self) -> str:
        """``name (abbreviation)`` for messages."""
        return f"{self.name} ({self.abbreviation})" if self.abbreviation else self.name


def _parse_conf(conf: Path) -> tuple[str, dict[str, list[str]]]:
    """``(section name, {lower-cased key: [values in file order]})`` of a SWORD conf file."""
    name = None
    fields: dict[str, list[str]] = {}
    lines = iter(conf.read_text(encoding="utf-8", errors="replace").splitlines())
    for line in lines:
        while line.endswith("\\"):  # a continued value
            line = line[:-1] + next(lines, "")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if name is None:
            if not (stripped.startswith("[") and stripped.endswith("]")):
                raise ValueError(f"{conf} is not a SWORD module conf file: its first setting line is {stripped!r}, "
                                 "expected '[ModuleName]'.")
            name = stripped[1:-1].strip()
        elif "=" in stripped:
            key, _, value = stripped.partition("=")
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    if not name:
        raise ValueError(f"{conf} is not a SWORD module conf file: it has no '[ModuleName]' line.")
    return name, fields


def library_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The SWORD library directory: ``root`` if given, else ``$SWORD_PATH``, else ``/usr/share/sword``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()


def installed_modules(root: str | os.PathLike[str] | None = None) -> list[SwordModule]:
    """The modules of the library at ``root`` (default ``$SWORD_PATH``, else ``/usr/share/sword``), by conf name.

    An absent root or ``mods.d`` directory gives an empty list. Conf files without ``ModDrv`` describe no module
    (libsword's ``globals.conf``) and are skipped.
    """
    root = library_root(root)
    confs = sorted((root / "mods.d").glob("*.conf")) if (root / "mods.d").is_dir() else []
    return [module for module in (SwordModule.from_conf(conf, root) for conf in confs) if module.driver]


def find_modules(names: Sequence[str], root: str | os.PathLike[str] | None = None) -> list[SwordModule]:
    """The installed module for each of ``names`` (case-insensitive section name, abbreviation or alias).

    Raises SwordModuleNotFoundError naming every missing module, the ``apt-get`` command that installs the known
    ones and the modules that are installed; ValueError when a name matches two different modules.
    """
    resolved_root = library_root(root)
    modules = installed_modules(resolved_root)
    found: list[SwordModule] = []
    missing: list[str] = []
    for requested in names:
        key = requested.lower()
        # A section name beats an abbreviation, which beats an Obsoletes alias.
        ranked = ([m for m in modules if m.name.lower() == key],
                  [m for m in modules if (m.abbreviation or "").lower() == key],
                  [m for m in modules if key in (alias.lower() for alias in m.aliases)])
        matches = next((candidates for candidates in ranked if candidates), [])
        if len(matches) > 1:
            raise ValueError(f"SWORD module name {requested!r} is ambiguous under {resolved_root}: it matches "
                             f"{', '.join(m.label() for m in matches)}; pass the full module name instead.")
        if matches:
            found.append(matches[0])
        else:
            missing.append(requested)
    if missing:
        raise SwordModuleNotFoundError(_missing_message(missing, resolved_root, modules))
    return found


def _missing_message(missing: list[str], root: Path, modules: list[SwordModule]) -> str:
    packages = sorted({_DEBIAN_PACKAGES[name.lower()] for name in missing if name.lower() in _DEBIAN_PACKAGES})
    unknown = [name for name in missing if name.lower() not in _DEBIAN_PACKAGES]
    what = (f"SWORD Bible module {missing[0]!r} is" if len(missing) == 1
            else f"SWORD Bible modules {', '.join(map(repr, missing))} are")
    steps = []
    if packages:
        steps.append(f"install {'it' if len(missing) == 1 else 'them'} with `apt-get install -y {' '.join(packages)}` "
                     "(Debian packages, as root; they go to /usr/share/sword)")
    if unknown:
        steps.append(f"find the Debian package of {', '.join(map(repr, unknown))} with `apt-cache search sword-text` "
                     "(the default KJV/WEB pair is `apt-get install -y sword-text-kjv sword-text-web`)")
    have = (f"Installed there: {', '.join(m.label() for m in modules)}." if modules
            else "No module is installed there (no mods.d/*.conf).")
    return (f"{what} not installed under {root}: {'; '.join(steps)}; or pass root= (or set ${ROOT_ENV}) to a SWORD "
            f"library holding mods.d/ and modules/. {have}")


_DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {"ZIP": zlib.decompress, "BZIP2": bz2.decompress,
                                                        "XZ": lzma.decompress}


def _check_readable(module: SwordModule) -> None:
    problem = None
    if module.driver.lower() != "ztext":
        problem = f"its driver is ModDrv={module.driver or '(none)'}; only zText modules are read"
    elif module.compression not in _DECOMPRESSORS:
        problem = f"CompressType={module.compression} is not one of {', '.join(_DECOMPRESSORS)}"
    elif module.versification not in VERSIFICATIONS:
        problem = (f"Versification={module.versification} has no table here (known: {', '.join(VERSIFICATIONS)}); "
                   "add one as the module docstring describes")
    elif module.source_type.lower() not in _NOTE_PATTERNS:
        problem = f"SourceType={module.source_type} markup is not handled (OSIS, ThML and Plaintext are)"
    elif module.locked:
        problem = "it is locked (CipherKey is set)"
    if problem:
        raise ValueError(f"SWORD module {module.label()} ({module.conf}) cannot be read: {problem}.")


def _read_entries(module: SwordModule, testament: str) -> list[bytes]:
    """The raw bytes of every index entry of one testament (b"" when empty); [] when its files are absent."""
    paths = [module.directory / f"{testament}.{suffix}" for suffix in ("bzv", "bzs", "bzz")]
    present = [path.is_file() for path in paths]
    if not any(present):
        return []
    if not all(present):
        raise FileNotFoundError(f"SWORD module {module.label()} is incomplete: "
                                f"{', '.join(str(p) for p, ok in zip(paths, present, strict=True) if not ok)} "
                                "missing; reinstall the module.")
    index, block_index, compressed = (path.read_bytes() for path in paths)
    if len(index) % 10 or len(block_index) % 12:
        raise ValueError(f"SWORD module {module.label()}: {paths[0].name} ({len(index)} bytes) or {paths[1].name} "
                         f"({len(block_index)} bytes) is not a whole number of 10- or 12-byte records; the files "
                         "are damaged.")
    blocks = list(struct.iter_unpack("<III", block_index))
    decompress = _DECOMPRESSORS[module.compression]
    decompressed: dict[int, bytes] = {}
    entries = []
    for number, (block, offset, size) in enumerate(struct.iter_unpack("<IIH", index)):
        if size == 0:
            entries.append(b"")
            continue
        if block not in decompressed:
            if block >= len(blocks):
                raise ValueError(f"SWORD module {module.label()}: entry {number} of {paths[0].name} points at "
                                 f"block {block}, but {paths[1].name} has {len(blocks)}; the files are damaged.")
            start, length, full_length = blocks[block]
            data = decompress(compressed[start:start + length])
            if len(data) != full_length:
                raise ValueError(f"SWORD module {module.label()}: block {block} of {paths[2].name} decompresses to "
                                 f"{len(data)} bytes, its record says {full_length}; the files are damaged.")
            decompressed[block] = data
        if offset + size > len(decompressed[block]):
            raise ValueError(f"SWORD module {module.label()}: entry {number} of {paths[0].name} ends at byte "
                             f"{offset + size} of block {block}, which has {len(decompressed[block])}.")
        entries.append(decompressed[block][offset:offset + size])
    return entries


@lru_cache(maxsize=None)
def _layout(versification: str, testament: int) -> tuple[int, tuple[tuple[int, VerseRef], ...]]:
    """``(entries in the testament, ((entry number, reference) for every verse and chapter heading))``.

    A chapter heading has verse number 0.
    """
    slots = []
    entry = 2  # module heading, testament heading
    for book, chapters in VERSIFICATIONS[versification][testament]:
        entry += 1  # book heading
        for chapter, verses in enumerate(chapters, 1):
            for verse in range(verses + 1):  # verse 0: the chapter heading
                slots.append((entry, VerseRef(book, chapter, verse)))
                entry += 1
    return entry, tuple(slots)


_CHAPTER_START = re.compile(r'<chapter\b(?=[^>]*\bsID=)[^>]*\bosisID="([^"]*)"')


def read_verses(module: str | SwordModule, root: str | os.PathLike[str] | None = None) -> dict[VerseRef, str]:
    """Every non-empty verse of ``module`` (a name or a :class:`SwordModule`), cleaned, in canonical order.

    Raises SwordModuleNotFoundError when the module is not installed, ValueError when its files do not match its
    versification (entry counts, chapter-heading milestones) or are damaged.
    """
    if isinstance(module, str):
        module = find_modules([module], root)[0]
    _check_readable(module)
    verses: dict[VerseRef, str] = {}
    for testament, name in enumerate(_TESTAMENTS):
        entries = _read_entries(module, name)
        if not entries:
            continue
        expected, slots = _layout(module.versification, testament)
        if len(entries) != expected:
            raise ValueError(f"SWORD module {module.label()}: {name}.bzv has {len(entries)} entries but the "
                             f"{module.versification} versification has {expected}; its conf's Versification does "
                             "not describe its files.")
        for entry, reference in slots:
            raw = entries[entry]
            if not raw:
                continue
            try:
                text = raw.decode(module.encoding)
            except UnicodeDecodeError as error:
                raise ValueError(f"SWORD module {module.label()}: {reference} is not valid {module.encoding} "
                                 f"({error}).") from error
            if reference.verse == 0:
                _check_chapter_heading(module, reference, text)
            else:
                cleaned = clean_markup(text, module.source_type)
                if cleaned:
                    verses[reference] = cleaned
    return verses


def _check_chapter_heading(module: SwordModule, reference: VerseRef, text: str) -> None:
    if module.source_type.lower() != "osis":
        return
    expected = f"{reference.book}.{reference.chapter}"
    for found in _CHAPTER_START.findall(text):
        if found != expected:
            raise ValueError(f"SWORD module {module.label()}: the index entry of the {expected} chapter heading holds "
                             f"the milestone of chapter {found}, so its index does not follow the "
                             f"{module.versification} versification its conf declares.")


_BOOK_END = re.compile(r'<div\b(?=[^>]*\beID=)(?=[^>]*\btype="book")[^>]*>')
_XML_NOTE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note>)", re.DOTALL)
_NOTE_PATTERNS: dict[str, re.Pattern[str] | None] = {"osis": _XML_NOTE, "thml": _XML_NOTE, "plaintext": None}
_TITLE = re.compile(r'<title\b(?![^>]*\bcanonical="true")[^>]*?(?:/>|>.*?</title>)', re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(?:div|p|l|lg|lb|br|chapter|verse|milestone|list|item|title)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
_USFM_MARKER = re.compile(r"\\[a-z]+[0-9]*\*?")
_NOTE_GAP = "\x00"
_NOTE_GAPS = re.compile(_NOTE_GAP + "+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+(?=[,.;:?!])")


def _close_note_gap(match: re.Match[str]) -> str:
    text, start, end = match.string, match.start(), match.end()
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    return " " if not before.isspace() and (after.isalnum() or after in "‘“([") else ""


def clean_markup(text: str, source_type: str = "OSIS") -> str:
    """Plain verse text from one entry's marked-up ``text`` (rules: module docstring, **Text**).

    ``source_type`` is the conf's ``SourceType``: ``OSIS`` or ``ThML`` (tags and notes removed) or ``Plaintext``
    (whitespace only).
    """
    kind = source_type.lower()
    if kind not in _NOTE_PATTERNS:
        raise ValueError(f"Unknown markup {source_type!r}: expected one of OSIS, ThML, Plaintext.")
    note = _NOTE_PATTERNS[kind]
    if note is not None:  # each step is skipped when its marker is absent: most verses have no note or title
        end = _BOOK_END.search(text) if 'type="book"' in text else None
        if end:
            text = text[:end.start()]
        if "<note" in text:
            text = note.sub(_NOTE_GAP, text)
        if "<title" in text:
            text = _TITLE.sub("", text)
        text = _TAG.sub("", _BLOCK_TAG.sub(" ", text))
        if _NOTE_GAP in text:
            text = _NOTE_GAPS.sub(_close_note_gap, text)
        if "&" in text:
            text = html.unescape(text)
        if "\\" in text:
            text = _USFM_MARKER.sub("", text)
        text = text.replace("¶", " ")
    return _SPACE_BEFORE_PUNCTUATION.sub("", " ".join(text.split()))


class BookSplits(NamedTuple):
    """Train, valid and test pairs, disjoint by book."""

    train: ParallelVerses
    valid: ParallelVerses
    test: ParallelVerses


@dataclass(frozen=True)
class ParallelVerses(Sequence[VersePair]):
    """Aligned verses of two modules, in canonical order; indexing gives :class:`VersePair` objects.

    Attributes:
        source_module, target_module: the modules' names (their conf section names).
        pairs: the aligned verses.
        source_only, target_only: references of non-empty verses of one module whose partner is empty or absent
            from the other's versification (within the same books as ``pairs`` after :meth:`select_books`).
    """

    source_module: str
    target_module: str
    pairs: tuple[VersePair, ...]
    source_only: tuple[VerseRef, ...] = ()
    target_only: tuple[VerseRef, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)

    @overload
    def __getitem__(self, index: int) -> VersePair: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[VersePair, ...]: ...

    def __getitem__(self, index: int | slice) -> VersePair | tuple[VersePair, ...]:
        return self.pairs[index]

    def __iter__(self) -> Iterator[VersePair]:
        return iter(self.pairs)

    @property
    def sources(self) -> list[str]:
        """The source texts, in order."""
        return [pair.source for pair in self.pairs]

    @property
    def targets(self) -> list[str]:
        """The target texts, in order."""
        return [pair.target for pair in self.pairs]

    def books(self) -> tuple[str, ...]:
        """The OSIS IDs of the books that have pairs, in canonical order."""
        return tuple(dict.fromkeys(pair.reference.book for pair in self.pairs))

    def select_books(self, books: Iterable[str]) -> ParallelVerses:
        """The pairs (and unpaired references) of ``books`` only, order kept."""
        wanted = frozenset(books)
        return ParallelVerses(self.source_module, self.target_module,
                              tuple(pair for pair in self.pairs if pair.reference.book in wanted),
                              tuple(ref for ref in self.source_only if ref.book in wanted),
                              tuple(ref for ref in self.target_only if ref.book in wanted))

    def drop_gapped_chapters(self) -> ParallelVerses:
        """Without the chapters where the two modules disagree on which verses exist.

        A chapter goes when it holds a source-only or target-only verse, and so does the book's next chapter when
        no pair follows that verse in its chapter (the verse's text was moved into the next chapter, shifting
        it). This is where a module's own numbering differs from its declared versification (see the module
        docstring), at the price of also dropping chapters with a mere omitted verse (KJV↔WEB: Luke 17, Acts 8,
        15 and 24, Romans 16).
        """
        last_paired: dict[tuple[str, int], int] = {}
        for pair in self.pairs:
            ref = pair.reference
            last_paired[ref.book, ref.chapter] = max(last_paired.get((ref.book, ref.chapter), 0), ref.verse)
        dropped: set[tuple[str, int]] = set()
        for ref in (*self.source_only, *self.target_only):
            dropped.add((ref.book, ref.chapter))
            if last_paired.get((ref.book, ref.chapter), 0) < ref.verse:
                dropped.add((ref.book, ref.chapter + 1))

        def kept(ref: VerseRef) -> bool:
            return (ref.book, ref.chapter) not in dropped

        return ParallelVerses(self.source_module, self.target_module,
                              tuple(pair for pair in self.pairs if kept(pair.reference)),
                              tuple(filter(kept, self.source_only)), tuple(filter(kept, self.target_only)))

    def split_by_book(self, valid_books: Collection[str] = VALID_BOOKS,
                      test_books: Collection[str] = TEST_BOOKS) -> BookSplits:
        """Train/valid/test: the pairs of ``valid_books``, of ``test_books`` and of every other book.

        The default books are :data:`VALID_BOOKS` and :data:`TEST_BOOKS`. Raises ValueError for a name that is no
        OSIS book ID of a known versification (a typo would silently move nothing) or a book in both sets.
        """
        for label, books in (("valid_books", valid_books), ("test_books", test_books)):
            if isinstance(books, str):
                raise ValueError(f"{label} must be a collection of OSIS book IDs such as ('Ruth',), got {books!r}.")
            unknown = sorted(set(books) - _KNOWN_BOOKS)
            if unknown:
                raise ValueError(f"{label} has {', '.join(map(repr, unknown))}, not OSIS book IDs of the "
                                 f"{'/'.join(VERSIFICATIONS)} versifications (e.g. 'Gen', '1Sam', 'Song', 'Phlm').")
        shared = sorted(set(valid_books) & set(test_books))
        if shared:
            raise ValueError(f"Books {', '.join(shared)} are in both valid_books and test_books; a book belongs to "
                             "one split.")
        every_book = {ref.book for ref in (*self.source_only, *self.target_only)} | set(self.books())
        return BookSplits(self.select_books(every_book - set(valid_books) - set(test_books)),
                          self.select_books(valid_books), self.select_books(test_books))


_SPLITS = ("train", "valid", "test")


def load_parallel_verses(source_module: str = "KJV", target_module: str = "WEB",
                         root: str | os.PathLike[str] | None = None, split: str | None = None, *,
                         valid_books: Collection[str] = VALID_BOOKS,
                         test_books: Collection[str] = TEST_BOOKS) -> ParallelVerses:
    """The verses of ``source_module`` and ``target_module`` aligned by reference (non-empty in both).

    Args:
        source_module, target_module: module names, case-insensitive (``"KJV"``, ``"WEB"``, ``"RV1909"`` or
            full names such as ``"engKJV2006eb"``).
        root: SWORD library root; default ``$SWORD_PATH``, else ``/usr/share/sword``.
        split: ``None`` for every pair, or ``"train"``, ``"valid"``, ``"test"`` for that part of
            :meth:`ParallelVerses.split_by_book` with ``valid_books`` and ``test_books``.

    Raises SwordModuleNotFoundError naming the missing modules and the ``apt-get install`` command (the default
    pair needs ``apt-get install -y sword-text-kjv sword-text-web``).
    """
    if split is not None and split not in _SPLITS:
        raise ValueError(f"split must be None or one of {', '.join(_SPLITS)}, got {split!r}.")
    source, target = find_modules([source_module, target_module], root)
    source_verses, target_verses = read_verses(source), read_verses(target)
    pairs = tuple(VersePair(ref, text, target_verses[ref]) for ref, text in source_verses.items()
                  if ref in target_verses)
    verses = ParallelVerses(source.name, target.name, pairs,
                            source_only=tuple(ref for ref in source_verses if ref not in target_verses),
                            target_only=tuple(ref for ref in target_verses if ref not in source_verses))
    if split is None:
        return verses
    return verses.split_by_book(valid_books, test_books)[_SPLITS.index(split)]
