"""Atomic writes of files and directories: write under a temporary name beside the destination, rename into place
only once the content is complete.

A reader, or a process that resumes after a crash, then sees the old version or the new one, never half of one:
``os.replace`` / ``os.rename`` are atomic within one filesystem, which is why the temporary name is always in the
destination's own directory. On failure (an exception, Ctrl-C) the temporary is removed and the destination is left
as it was. Temporary names start with ``.tmp-`` (a directory being swapped out: ``.trash-``), so whatever a killed
process leaves behind is hidden and recognisable (:func:`moekit.training.checkpoint.clean_partial` removes them).

``fsync=True`` also flushes the data and the directory entry to disk before returning, for files that must survive
a power loss (checkpoints), not only a killed process.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_synced",
    "fsync_dir",
]


def _sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name in ``path``'s directory; pid and random suffix keep concurrent writers apart."""
    return path.with_name(f".{kind}-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (in place, not atomically) and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the filesystem supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; write the file there (any writer: ``savefig``, ``save_file``,
    ``copyfile``). When the block ends normally it is renamed onto ``path`` (replacing an existing file); when it
    raises, the temporary is removed and ``path`` is untouched. The parent directory must exist."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Replace the file ``path`` with ``data`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        if fsync:
            write_synced(tmp, data)
        else:
            tmp.write_bytes(data)
    if fsync:
        fsync_dir(Path(path).parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """Replace the file ``path`` with ``text`` (UTF-8 unless ``encoding`` says otherwise) atomically."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a new empty directory beside ``path``; fill it. When the block ends normally it takes ``path``'s
    place; when it raises, it is removed and ``path`` is untouched. The parent directory must exist.

    An existing ``path`` is swapped out, not deleted first: it is renamed to a ``.trash-`` name, the new directory
    renamed in, then the old one deleted, so at every moment ``path`` is either the complete old directory or the
    complete new one (a crash between the two renames leaves the old one under its ``.trash-`` name). With
    ``fsync``, the new directory's entries and the parent's are flushed (fsync the files as you write them, e.g.
    with :func:`write_synced`)."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            fsync_dir(tmp)
        if path.exists():
            trash = _sibling(path, "trash")
            os.rename(path, trash)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(trash, path)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_dir(path.parent)
