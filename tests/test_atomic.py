"""The atomic writer: a success replaces the destination; a failure inside the block leaves the old file or
directory as it was and no temporary behind; a full or read-only disk is one line naming the destination."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from moekit.atomic import (
    WriteError,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    is_disk_error,
)
from moekit.errors import MoekitError


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


# -- disk failures (issue 18): one line naming the destination, no partial file, still an OSError ----------------

_as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fsync", [False, True])
def test_a_full_disk_is_a_one_line_write_error_and_leaves_no_temp(tmp_path, monkeypatch, fsync):
    dst = tmp_path / "out.json"
    dst.write_text("old")
    monkeypatch.setattr("moekit.atomic.write_synced" if fsync else "pathlib.Path.write_bytes", _full_disk)
    with pytest.raises(WriteError) as info:
        atomic_write_text(dst, "new", fsync=fsync)
    assert str(info.value) == f"cannot write {dst}: no space left on the device (free some space, or write elsewhere)"
    assert isinstance(info.value, MoekitError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(dst)
    assert dst.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_full_disk_inside_an_atomic_dir_names_the_directory_and_removes_the_partial_one(tmp_path):
    dst = tmp_path / "ckpt"
    with pytest.raises(WriteError, match=f"cannot write {dst}: no space left"), atomic_dir(dst) as tmp:
        (tmp / "model.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.bin"))
    assert list(tmp_path.iterdir()) == []


def test_a_safetensors_write_failure_is_recognised(tmp_path):
    from safetensors import SafetensorError

    dst = tmp_path / "t.safetensors"
    with pytest.raises(WriteError, match="no space left"), atomic_path(dst):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []
    assert not is_disk_error(SafetensorError("Error while deserializing header: InvalidHeader"))


def test_an_error_about_another_file_keeps_its_own_message(tmp_path):
    # A copy whose source cannot be read is not a failure to write the destination.
    src = str(tmp_path / "elsewhere" / "src.bin")
    with pytest.raises(PermissionError) as info, atomic_path(tmp_path / "dst.bin"):
        raise PermissionError(errno.EACCES, "Permission denied", src)
    assert not isinstance(info.value, WriteError) and info.value.filename == src
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")
    with pytest.raises(Boom), atomic_path(tmp_path / "x"):
        raise Boom


def test_a_write_error_pickles():
    err = WriteError("/data/x", OSError(errno.EROFS, "Read-only file system"))
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == "cannot write /data/x: the file system is read-only (write elsewhere)"
    assert back.errno == errno.EROFS


def test_check_writable_probes_the_nearest_existing_directory_and_leaves_nothing(tmp_path):
    assert check_writable(tmp_path / "a" / "b") == tmp_path
    assert check_writable(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoekitError, match="is not a directory"):
        check_writable(tmp_path / "file" / "out")


def test_check_writable_reports_a_full_disk(tmp_path, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "x" in mode:
            f.write = _full_disk
        return f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'out'}: no space left"):
        check_writable(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@_as_root
def test_a_read_only_directory_is_refused_by_the_probe_and_by_the_writer(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="permission denied"):
            check_writable(ro / "out")
        with pytest.raises(WriteError, match=f"cannot write {ro / 'a.txt'}: permission denied"):
            atomic_write_text(ro / "a.txt", "x")
        with pytest.raises(WriteError, match=f"cannot write {ro / 'd'}: permission denied"), atomic_dir(ro / "d"):
            pass
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_make_dirs_reports_a_read_only_file_system(tmp_path, monkeypatch):
    from moekit.atomic import make_dirs

    assert make_dirs(tmp_path / "a" / "b").is_dir()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'c'}: the file system is read-only"):
        make_dirs(tmp_path / "c")
