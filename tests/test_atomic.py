"""The atomic writer: a success replaces the destination; a failure inside the block leaves the old file or
directory as it was and no temporary behind."""

from __future__ import annotations

import pytest

from moekit.atomic import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text


class Boom(Exception):
    pass


def test_atomic_path_replaces_on_success(tmp_path):
    dst = tmp_path / "out.json"
    dst.write_text("old")
    with atomic_path(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-out.json-")
        tmp.write_text("new")
        assert dst.read_text() == "old"  # not visible until the block ends
    assert dst.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_path_failure_keeps_the_old_file_and_no_temp(tmp_path, fsync):
    dst = tmp_path / "out.json"
    dst.write_text("old")
    with pytest.raises(Boom), atomic_path(dst, fsync=fsync) as tmp:
        tmp.write_text("half")
        raise Boom
    assert dst.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_failure_before_writing_anything(tmp_path):
    dst = tmp_path / "new.txt"
    with pytest.raises(Boom), atomic_path(dst):
        raise Boom
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_write_bytes_and_text(tmp_path, fsync):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01", fsync=fsync)
    atomic_write_text(tmp_path / "b.txt", "café\n", fsync=fsync)
    atomic_write_text(tmp_path / "b.txt", "second", fsync=fsync)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


def test_atomic_write_text_is_utf8(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "café")
    assert (tmp_path / "t.txt").read_bytes() == "café".encode()


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_dir_creates_and_swaps(tmp_path, fsync):
    dst = tmp_path / "ckpt"
    with atomic_dir(dst, fsync=fsync) as tmp:
        assert tmp.is_dir() and tmp.name.startswith(".tmp-ckpt-") and not dst.exists()
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in dst.iterdir()) == ["a"]
    with atomic_dir(dst, fsync=fsync) as tmp:
        (tmp / "b").write_text("2")
        assert (dst / "a").is_file()  # the old directory stays in place while the new one is written
    assert sorted(p.name for p in dst.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .tmp- or .trash- left


def test_atomic_dir_failure_keeps_the_old_directory_and_no_temp(tmp_path):
    dst = tmp_path / "adapters"
    dst.mkdir()
    (dst / "weights").write_text("old")
    with pytest.raises(Boom), atomic_dir(dst) as tmp:
        (tmp / "weights").write_text("half")
        raise Boom
    assert (dst / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]


def test_atomic_dir_restores_the_old_directory_when_the_swap_fails(tmp_path, monkeypatch):
    import os

    import moekit.atomic as atomic

    dst = tmp_path / "run"
    dst.mkdir()
    (dst / "f").write_text("old")
    real_rename = os.rename

    def rename(src, target):
        if str(src).startswith(str(tmp_path / ".tmp-")):
            raise OSError("disk trouble")
        real_rename(src, target)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="disk trouble"), atomic_dir(dst) as tmp:
        (tmp / "f").write_text("new")
    assert (dst / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
