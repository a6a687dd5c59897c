"""Parallel Bible verses: zText index layout, markup cleaning, alignment across versifications, the book split.

Every test but the last builds tiny SWORD modules with its own zText writer, so nothing needs the Debian
packages; the last one reads the real modules when they are installed.
"""

from __future__ import annotations

import bz2
import struct
import zlib
from pathlib import Path

import pytest
from sword_modules import entries_in_testament, entry_number, write_module

from effml.data.corpora import CorpusUnavailableError
from effml.data.parallel_text import (TEST_BOOKS, VALID_BOOKS, VERSIFICATIONS, SwordModuleNotFoundError, VerseRef,
                                      clean_markup, find_modules, installed_modules, load_parallel_verses,
                                      read_verses)


R = VerseRef
# Marked-up entries as osis2mod writes them, and the plain text each must give (None: no verse).
SOURCE = {
    R("Gen", 1, 1): ('In the <w lemma="strong:H7225">beginning</w> <w lemma="strong:H0430">God</w> created the '
                     'heaven &amp; the earth.<note placement="foot"><reference type="annotateRef">1.1 </reference>'
                     'Heb. <hi type="italic">Elohim</hi></note> ',
                     "In the beginning God created the heaven & the earth."),
    R("Gen", 1, 2): ('<div type="x-milestone" subType="x-preverse" sID="pv1"/><div sID="gen4" type="x-p"/> '
                     '<title>The Creation</title>¶ And the earth was <transChange type="added">without</transChange>'
                     '\n form, and <divineName>\\nd LORD</divineName>\u2019s  void. ',
                     "And the earth was without form, and LORD\u2019s void."),
    R("Gen", 1, 3): ("", None),  # an entry of size 0
    R("Gen", 1, 4): ('<div type="x-milestone" subType="x-preverse" sID="pv2"/><note>only a note</note>', None),
    R("Gen", 50, 26): ("So Joseph died.", "So Joseph died."),
    R("Ps", 3, 1): ('<title canonical="true" type="psalm">A <w lemma="strong:H4210">Psalm</w> of David.</title> '
                    '<lg sID="g1"/><l level="1" sID="g2"/>LORD, how are they increased!<l eID="g2" level="1"/>'
                    '<l level="2" sID="g3"/>Many <transChange type="added">are</transChange> they.<l eID="g3"/>',
                    "A Psalm of David. LORD, how are they increased! Many are they."),
    R("Ps", 119, 9): ('<title><foreign>\u05d1 BETH.</foreign></title> Wherewithal shall a young man cleanse his way?',
                      "Wherewithal shall a young man cleanse his way?"),
    R("Mal", 4, 6): ("And he shall turn the heart of the fathers.", "And he shall turn the heart of the fathers."),
    R("Matt", 1, 1): ("The book of the generation of Jesus Christ.", "The book of the generation of Jesus Christ."),
    R("John", 3, 16): ('<q marker="" who="Jesus">For God so loved<note type="crossReference">Rom 5:8</note>the '
                       'world, that he gave his only begotten Son,<note>Or, unique</note>that whosoever'
                       '<note>n</note> believeth&#8230;</q>',
                       "For God so loved the world, that he gave his only begotten Son, that whosoever "
                       "believeth\u2026"),
    R("Rev", 22, 21): ('The grace of our Lord Jesus Christ be with you all. Amen. <chapter eID="Rev.22"/>'
                       '<div canonical="true" eID="b1" osisID="Rev" type="book"/> <div sID="g" type="glossary"/> '
                       '<title type="main">Glossary</title> Abaddon is Hebrew for destruction.',
                       "The grace of our Lord Jesus Christ be with you all. Amen."),
}
EXPECTED_SOURCE = {ref: plain for ref, (_, plain) in SOURCE.items() if plain is not None}
TARGET = {  # an NRSVA module: 3John 1:15 and Tobit exist only in its versification
    R("Gen", 1, 1): "In the beginning, God created the heavens and the earth.",
    R("Gen", 1, 2): "The earth was formless and empty.",
    R("Gen", 1, 3): "God said, \u201cLet there be light,\u201d and there was light.",
    R("Gen", 50, 26): "",
    R("Matt", 1, 1): "The book of the genealogy of Jesus Christ.",
    R("John", 3, 16): "For God so loved the world.",
    R("3John", 1, 15): "Peace be to you.",
    R("Tob", 1, 1): "The book of the words of Tobit.",
    R("Rev", 22, 21): "The grace of the Lord Jesus Christ be with all the saints. Amen.",
}


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A SWORD library with a KJV-versified source module and an NRSVA target module."""
    write_module(tmp_path, "engTestKJV", {ref: raw for ref, (raw, _) in SOURCE.items()}, abbreviation="KJV")
    write_module(tmp_path, "engTestWEB", TARGET, versification="NRSVA", abbreviation="WEB",
                 conf={"Obsoletes": "eng_web_old"})
    return tmp_path


def test_versification_tables_have_the_published_sizes():
    kjv_ot, kjv_nt = VERSIFICATIONS["KJV"]
    assert (len(kjv_ot), len(kjv_nt)) == (39, 27)
    assert sum(len(chapters) for _, chapters in kjv_ot + kjv_nt) == 1189
    assert [sum(sum(chapters) for _, chapters in books) for books in (kjv_ot, kjv_nt)] == [23145, 7957]
    assert (entries_in_testament("KJV", 0), entries_in_testament("KJV", 1)) == (24115, 8246)  # the real .bzv sizes / 10
    nrsva_ot, nrsva_nt = VERSIFICATIONS["NRSVA"]
    assert nrsva_ot[:39] == kjv_ot and len(nrsva_ot) == 56
    assert (entries_in_testament("NRSVA", 0), entries_in_testament("NRSVA", 1)) == (31027, 8248)
    changed = {(book, n) for (book, new), (_, old) in zip(nrsva_nt, kjv_nt, strict=True)
               for n, (a, b) in enumerate(zip(new, old, strict=True), 1) if a != b}
    assert changed == {("3John", 1), ("Rev", 12)}


def test_index_layout_matches_the_known_entries(tmp_path: Path):
    """Raw entry numbers, not the layout under test, place the texts; the loader must name them right."""
    john_3_16 = 2 + (1 + 28 + 1071) + (1 + 16 + 678) + (1 + 24 + 1151) + 1 + (1 + 51) + (1 + 25) + 1 + 15
    raw = {("ot", 4): "Genesis one one.", ("ot", 5): "Genesis one two.", ("ot", 24114): "Last of Malachi.",
           ("nt", 4): "Matthew one one.", ("nt", john_3_16): "For God so loved.", ("nt", 8245): "Last of Revelation.",
           ("ot", 3): "a chapter heading", ("ot", 2): "a book heading", ("nt", 1): "a testament heading"}
    write_module(tmp_path, "Raw", {}, extra_entries=raw, headings=False)
    assert list(read_verses("Raw", tmp_path).items()) == [
        (R("Gen", 1, 1), "Genesis one one."), (R("Gen", 1, 2), "Genesis one two."),
        (R("Mal", 4, 6), "Last of Malachi."), (R("Matt", 1, 1), "Matthew one one."),
        (R("John", 3, 16), "For God so loved."), (R("Rev", 22, 21), "Last of Revelation.")]
    assert entry_number("KJV", R("John", 3, 16)) == ("nt", john_3_16)  # the writer's layout agrees
    assert str(R("John", 3, 16)) == "John.3.16"


@pytest.mark.parametrize("compression", [(zlib.compress, "ZIP"), (bz2.compress, "BZIP2")], ids=["zip", "bzip2"])
@pytest.mark.parametrize("per_block", [1, 3])
def test_reads_back_exactly_the_plain_verses(tmp_path: Path, compression, per_block: int):
    write_module(tmp_path, "Src", {ref: raw for ref, (raw, _) in SOURCE.items()}, compress=compression[0],
                 compress_type=compression[1], per_block=per_block)
    verses = read_verses("src", tmp_path)
    assert list(verses.items()) == list(EXPECTED_SOURCE.items())  # canonical order, headings and empties left out
    bzs = (tmp_path / "modules/texts/ztext/src/ot.bzs").stat().st_size
    assert bzs // 12 > 1  # several blocks were read


@pytest.mark.parametrize(("raw", "plain"), [
    ("word<note>n</note>next", "word next"),
    ("word,<note>n</note>\u201cQuoted\u201d", "word, \u201cQuoted\u201d"),
    ("word<note>n</note>.", "word."),
    ("coins</q> <note>n</note> <q>? Not one", "coins? Not one"),
    ("<note>n</note>Start", "Start"),
    ("a &lt;b&gt; &#x2019;c", "a <b> \u2019c"),
    ("<title type=\"x-section\"/>kept", "kept"),
])
def test_markup_rules(raw: str, plain: str):
    assert clean_markup(raw) == plain


def test_markup_of_other_source_types():
    assert clean_markup("<sync type=\"Strongs\" value=\"H1\"/>Grace<note>n</note> be  with you.", "ThML") == \
        "Grace be with you."
    assert clean_markup("  a <b>  kept \n", "Plaintext") == "a <b> kept"
    with pytest.raises(ValueError, match="GBF"):
        clean_markup("x", "GBF")


def test_aligns_across_versifications(library: Path):
    verses = load_parallel_verses("kjv", "Web", root=library)
    assert (verses.source_module, verses.target_module) == ("engTestKJV", "engTestWEB")
    assert [(pair.reference, pair.source, pair.target) for pair in verses] == [
        (ref, EXPECTED_SOURCE[ref], TARGET[ref])
        for ref in (R("Gen", 1, 1), R("Gen", 1, 2), R("Matt", 1, 1), R("John", 3, 16), R("Rev", 22, 21))]
    assert verses.source_only == (R("Gen", 50, 26), R("Ps", 3, 1), R("Ps", 119, 9), R("Mal", 4, 6))
    assert verses.target_only == (R("Gen", 1, 3), R("Tob", 1, 1), R("3John", 1, 15))
    assert verses.sources[0] == verses[0].source == EXPECTED_SOURCE[R("Gen", 1, 1)]
    assert verses.books() == ("Gen", "Matt", "John", "Rev")


def test_module_names_are_case_insensitive_and_ranked(library: Path):
    names = [module.name for module in find_modules(["ENGTESTWEB", "eng_web_old", "kJv", "web"], library)]
    assert names == ["engTestWEB", "engTestWEB", "engTestKJV", "engTestWEB"]
    write_module(library, "engOtherKJV", {R("Gen", 1, 1): "x"}, abbreviation="KJV")
    with pytest.raises(ValueError, match="'KJV' is ambiguous.*engOtherKJV \\(KJV\\), engTestKJV \\(KJV\\)"):
        find_modules(["KJV"], library)
    assert find_modules(["engtestkjv"], library)[0].name == "engTestKJV"  # a section name beats an abbreviation


def first_verse_of_every_book(text: str) -> dict[VerseRef, str]:
    return {R(book, 1, 1): f"{text} {book}." for books in VERSIFICATIONS["KJV"] for book, _ in books}


def test_split_by_book_is_disjoint_complete_and_deterministic(tmp_path: Path):
    write_module(tmp_path, "A", first_verse_of_every_book("Source"))
    write_module(tmp_path, "B", first_verse_of_every_book("Target"))
    verses = load_parallel_verses("A", "B", root=tmp_path)
    splits = verses.split_by_book()
    books = [set(part.books()) for part in splits]
    assert books[1] == set(VALID_BOOKS) and books[2] == set(TEST_BOOKS)
    assert not (books[0] & books[1] or books[0] & books[2] or books[1] & books[2])
    assert sum(len(part) for part in splits) == len(verses) == 66
    assert all(pair.reference.book in books[0] for pair in splits.train)
    assert load_parallel_verses("A", "B", root=tmp_path).split_by_book() == splits
    for name, part in zip(("train", "valid", "test"), splits, strict=True):
        assert load_parallel_verses("A", "B", root=tmp_path, split=name) == part
    custom = verses.split_by_book(valid_books=("Gen",), test_books=("Rev", "Tob"))
    assert [part.books() for part in custom[1:]] == [("Gen",), ("Rev",)] and len(custom.train) == 64


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"valid_books": ("Genesis",)}, "'Genesis', not OSIS book IDs"),
    ({"valid_books": ("Gen", "Ruth"), "test_books": ("Ruth",)}, "Ruth are in both"),
    ({"test_books": "Ruth"}, "collection of OSIS book IDs"),
])
def test_split_by_book_refuses_bad_book_lists(library: Path, kwargs, message: str):
    with pytest.raises(ValueError, match=message):
        load_parallel_verses(root=library).split_by_book(**kwargs)


def test_split_argument_is_checked(library: Path):
    with pytest.raises(ValueError, match="split must be None or one of train, valid, test"):
        load_parallel_verses(root=library, split="validation")


def test_drop_gapped_chapters_removes_shifted_chapters(tmp_path: Path):
    shared = {R("Num", 11, 1): "eleven", R("Num", 12, 1): "twelve", R("Num", 13, 1): "thirteen",
              R("Num", 14, 1): "fourteen", R("Luke", 17, 36): "", R("Luke", 17, 37): "last"}
    write_module(tmp_path, "A", {**shared, R("Num", 12, 16): "moved away", R("Luke", 17, 36): "omitted"})
    write_module(tmp_path, "B", shared)
    kept = load_parallel_verses("A", "B", root=tmp_path).drop_gapped_chapters()
    # Num 12 has a source-only last verse, so Num 13 (where its text went) goes too; Luke 17:36 is followed by a
    # pair, so only Luke 17 goes.
    assert [pair.reference for pair in kept] == [R("Num", 11, 1), R("Num", 14, 1)]
    assert kept.source_only == () == kept.target_only


def test_missing_modules_name_the_debian_packages(tmp_path: Path):
    with pytest.raises(SwordModuleNotFoundError) as caught:
        load_parallel_verses(root=tmp_path / "nowhere")
    message = str(caught.value)
    assert "'KJV', 'WEB' are not installed" in message
    assert "apt-get install -y sword-text-kjv sword-text-web" in message
    assert "No module is installed there" in message
    assert isinstance(caught.value, CorpusUnavailableError)


def test_unknown_module_lists_the_installed_ones(library: Path):
    with pytest.raises(SwordModuleNotFoundError, match=r"'RV1909' is not installed.*sword-text-sparv.*"
                                                         r"Installed there: engTestKJV \(KJV\), engTestWEB \(WEB\)"):
        load_parallel_verses("KJV", "RV1909", root=library)
    with pytest.raises(SwordModuleNotFoundError, match="apt-cache search sword-text"):
        read_verses("Vulgate", library)


def test_root_comes_from_sword_path(library: Path, monkeypatch):
    monkeypatch.setenv("SWORD_PATH", str(library))
    assert [module.name for module in installed_modules()] == ["engTestKJV", "engTestWEB"]
    module = find_modules(["web"])[0]
    assert (module.versification, module.aliases, module.directory.is_dir()) == ("NRSVA", ("eng_web_old",), True)


def test_refuses_a_module_whose_files_do_not_fit_its_versification(tmp_path: Path):
    write_module(tmp_path, "Wrong", TARGET, versification="NRSVA", conf={"Versification": "KJV"})
    with pytest.raises(ValueError, match="ot.bzv has 31027 entries but the KJV versification has 24115"):
        read_verses("Wrong", tmp_path)


def test_refuses_a_chapter_heading_of_another_chapter(tmp_path: Path):
    heading = entry_number("KJV", R("Gen", 2, 0))
    write_module(tmp_path, "Shifted", {R("Gen", 2, 1): "text"},
                 extra_entries={heading: '<chapter n="3" osisID="Gen.3" sID="Gen.3"/>'})
    with pytest.raises(ValueError, match="Gen.2 chapter heading holds the milestone of chapter Gen.3"):
        read_verses("Shifted", tmp_path)


@pytest.mark.parametrize(("setting", "message"), [
    (("ModDrv", "RawText"), "only zText modules are read"),
    (("Versification", "Vulg"), "Versification=VULG has no table"),
    (("CompressType", "LZSS"), "CompressType=LZSS is not one of"),
    (("SourceType", "GBF"), "SourceType=GBF markup is not handled"),
    (("CipherKey", "secret"), "it is locked"),
])
def test_refuses_modules_it_cannot_read(tmp_path: Path, setting: tuple[str, str], message: str):
    write_module(tmp_path, "Odd", {R("Gen", 1, 1): "text"}, conf=dict([setting]))
    with pytest.raises(ValueError, match=message):
        read_verses("Odd", tmp_path)


def truncate_index(directory: Path) -> None:
    (directory / "ot.bzv").write_bytes((directory / "ot.bzv").read_bytes()[:-3])


def point_past_the_blocks(directory: Path) -> None:
    index = bytearray((directory / "nt.bzv").read_bytes())
    number = next(i for i in range(0, len(index), 10) if struct.unpack_from("<IIH", index, i)[2])
    struct.pack_into("<I", index, number, 99)
    (directory / "nt.bzv").write_bytes(bytes(index))


def misstate_a_block_size(directory: Path) -> None:
    offset, size, full_size = struct.unpack("<III", (directory / "ot.bzs").read_bytes()[:12])
    (directory / "ot.bzs").write_bytes(struct.pack("<III", offset, size, full_size + 1)
                                       + (directory / "ot.bzs").read_bytes()[12:])


@pytest.mark.parametrize(("damage", "error", "message"), [
    (truncate_index, ValueError, "not a whole number of 10- or 12-byte records"),
    (lambda directory: (directory / "nt.bzz").unlink(), FileNotFoundError, "nt.bzz missing"),
    (point_past_the_blocks, ValueError, "points at block 99, but nt.bzs has 1"),
    (misstate_a_block_size, ValueError, "block 0 of ot.bzz decompresses to"),
])
def test_damaged_files_are_reported(tmp_path: Path, damage, error, message: str):
    write_module(tmp_path, "Cut", {R("Gen", 1, 1): "In the beginning.", R("Matt", 1, 1): "The book."})
    read_verses("Cut", tmp_path)
    damage(tmp_path / "modules/texts/ztext/cut")
    with pytest.raises(error, match=message):
        read_verses("Cut", tmp_path)


def test_a_module_without_an_old_testament_reads(tmp_path: Path):
    write_module(tmp_path, "NTOnly", {R("Matt", 1, 1): "The book."})
    for suffix in ("bzv", "bzs", "bzz"):
        (tmp_path / f"modules/texts/ztext/ntonly/ot.{suffix}").unlink()
    assert read_verses("NTOnly", tmp_path) == {R("Matt", 1, 1): "The book."}


REAL = all(Path(f"/usr/share/sword/mods.d/{name}.conf").is_file() for name in ("engKJV2006eb", "engWEB2015eb"))


@pytest.mark.skipif(not REAL, reason="Debian's sword-text-kjv and sword-text-web are not installed (30 MB of "
                    "Bible modules; CI does not install them, the synthetic modules above cover the reader)")
def test_real_kjv_and_web_modules():
    verses = load_parallel_verses("KJV", "WEB", root="/usr/share/sword")
    pairs = {pair.reference: pair for pair in verses}
    assert pairs[R("Gen", 1, 1)][1:] == ("In the beginning God created the heaven and the earth.",
                                         "In the beginning, God created the heavens and the earth.")
    assert pairs[R("John", 3, 16)].target == ("For God so loved the world, that he gave his only born Son, that "
                                              "whoever believes in him should not perish, but have eternal life.")
    assert pairs[R("Rev", 22, 21)][1:] == ("The grace of our Lord Jesus Christ be with you all. Amen.",
                                           "The grace of the Lord Jesus Christ be with all the saints. Amen.")
    assert len(verses) > 31000 and not any("<" in text or "&" in text for text in verses.sources + verses.targets)
    assert [len(part) for part in verses.split_by_book()][1:] == [1754, 1752]
