"""A writer of tiny SWORD zText modules (a library root with ``mods.d`` and module files), for tests that read
parallel verses without the Debian packages."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from effml.data.parallel_text import VERSIFICATIONS, VerseRef


def entry_number(versification: str, ref: VerseRef) -> tuple[str, int]:
    """``(testament file, index entry)`` of ``ref`` (verse 0: its chapter heading), in closed form.

    Layout: entry 0 module heading, 1 testament heading, then per book a heading entry and per chapter a heading
    entry followed by the verses.
    """
    for testament, books in zip(("ot", "nt"), VERSIFICATIONS[versification], strict=True):
        book_heading = 2
        for book, chapters in books:
            if book == ref.book:
                return testament, book_heading + ref.chapter + sum(chapters[:ref.chapter - 1]) + ref.verse
            book_heading += 1 + len(chapters) + sum(chapters)
    raise KeyError(ref)


def entries_in_testament(versification: str, testament: int) -> int:
    books = VERSIFICATIONS[versification][testament]
    return 2 + sum(1 + len(chapters) + sum(chapters) for _, chapters in books)


def write_module(root: Path, name: str, verses: dict[VerseRef, str], *, versification: str = "KJV",
                 abbreviation: str | None = None, compress: Callable[[bytes], bytes] = zlib.compress,
                 compress_type: str = "ZIP", per_block: int = 3, conf: dict[str, str] | None = None,
                 headings: bool = True, extra_entries: dict[tuple[str, int], str] | None = None) -> None:
    """A zText module ``name`` under the library ``root``: ``verses`` at their entries, book and chapter headings
    (OSIS milestones) for the books used, blocks of ``per_block`` non-empty entries; ``extra_entries`` puts raw
    text at ``(testament, entry)``; ``conf`` replaces or adds conf settings. An empty text writes an entry of
    size 0."""
    entries: dict[str, dict[int, str]] = {"ot": {}, "nt": {}}
    entries["ot"][1] = '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $"/>'
    for ref, text in verses.items():
        testament, entry = entry_number(versification, ref)
        entries[testament][entry] = text
        if headings:
            chapter_heading = entry_number(versification, ref._replace(verse=0))[1]
            book_heading = entry_number(versification, VerseRef(ref.book, 1, 0))[1] - 1
            entries[testament][chapter_heading] = (f'<chapter n="{ref.chapter}" osisID="{ref.book}.{ref.chapter}" '
                                                   f'sID="{ref.book}.{ref.chapter}"/> ')
            entries[testament][book_heading] = (f'<div osisID="{ref.book}" sID="b1" type="book"/> '
                                                f'<title type="main">The Book of {ref.book}</title>')
    for (testament, entry), text in (extra_entries or {}).items():
        entries[testament][entry] = text
    directory = root / "modules" / "texts" / "ztext" / name.lower()
    directory.mkdir(parents=True)
    for number, testament in enumerate(("ot", "nt")):
        index, blocks, block_index, compressed, in_block = [], [], [], b"", 0
        for entry in range(entries_in_testament(versification, number)):
            data = entries[testament].get(entry, "").encode("utf-8")
            if not data:
                index.append(struct.pack("<IIH", 0, 0, 0))
                continue
            if not blocks or in_block == per_block:
                blocks.append(b"")
                in_block = 0
            index.append(struct.pack("<IIH", len(blocks) - 1, len(blocks[-1]), len(data)))
            blocks[-1] += data
            in_block += 1
        for block in blocks:
            packed = compress(block)
            block_index.append(struct.pack("<III", len(compressed), len(packed), len(block)))
            compressed += packed
        (directory / f"{testament}.bzv").write_bytes(b"".join(index))
        (directory / f"{testament}.bzs").write_bytes(b"".join(block_index))
        (directory / f"{testament}.bzz").write_bytes(compressed)
    settings = {"DataPath": f"./modules/texts/ztext/{name.lower()}/", "ModDrv": "zText", "SourceType": "OSIS",
                "Encoding": "UTF-8", "CompressType": compress_type, "BlockType": "BOOK",
                "Versification": versification, "About": "A test module \\\n  spread over two lines"}
    if abbreviation:
        settings["Abbreviation"] = abbreviation
    settings.update(conf or {})
    (root / "mods.d").mkdir(exist_ok=True)
    (root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\n# a comment\n" + "".join(f"{key}={value}\n" for key, value in settings.items()), encoding="utf-8")


# A toy KJV→WEB pair: random sentences over a few words, "modernised" by replacing the archaic ones.
ARCHAIC = {"thou": "you", "hast": "have", "unto": "to", "saith": "says", "thee": "you", "ye": "you"}
WORDS = ["thou", "hast", "said", "unto", "the", "people", "and", "thee", "ye", "shall", "go", "saith", "lord",
         "land", "of", "water", "bread", "went", "up"]
VALID_BOOK, TEST_BOOK = "Josh", "Ruth"
LONG_VERSE = VerseRef("Exod", 2, 1)  # one training verse far longer than the others


def verse_text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words)).capitalize() + "."


def modern(text: str) -> str:
    return " ".join(ARCHAIC.get(word, word) for word in text.split())


def write_toy_verse_pair(root: Path) -> None:
    """KJV-like and WEB-like modules (abbreviations KJV and WEB) under ``root``: 31 + 10 training verses (Gen, Exod)
    and one of 80 words (``LONG_VERSE``), 10 valid (Josh), 22 held-out (Ruth), each target ``modern(source)``."""
    rng = np.random.default_rng(0)
    refs = ([VerseRef("Gen", 1, verse) for verse in range(1, 32)] + [VerseRef("Exod", 1, v) for v in range(1, 11)]
            + [LONG_VERSE] + [VerseRef(VALID_BOOK, 1, v) for v in range(1, 11)]
            + [VerseRef(TEST_BOOK, 1, v) for v in range(1, 23)])
    source = {ref: verse_text(rng, 80 if ref == LONG_VERSE else int(rng.integers(3, 9))) for ref in refs}
    write_module(root, "engTestKJV", source, abbreviation="KJV")
    write_module(root, "engTestWEB", {ref: modern(text) for ref, text in source.items()}, abbreviation="WEB")
