"""Atomic writes of files and directories: write under a temporary name beside the destination, rename into place
only once the content is complete.

A reader, or a process that resumes after a crash, then sees the old version or the new one, never half of one:
``os.replace`` / ``os.rename`` are atomic within one filesystem, which is why the temporary name is always in the
destination's own directory. On failure (an exception, Ctrl-C) the temporary is removed and the destination is left
as it was. Temporary names start with ``.tmp-`` (a directory being swapped out: ``.trash-``), so whatever a killed
process leaves behind is hidden and recognisable (:func:`moekit.training.checkpoint.clean_partial` removes them).

``fsync=True`` also flushes the data and the directory entry to disk before returning, for files that must survive
a power loss (checkpoints), not only a killed process.

A full disk, a read-only file system or a directory without write permission (``ENOSPC``, ``EDQUOT``, ``EFBIG``,
``EROFS``, ``EACCES``, ``EPERM``) while writing is raised as :class:`WriteError`, one line naming the destination;
it is a :class:`~moekit.errors.MoekitError` (the command line prints it without a traceback) and still an
``OSError`` with the original ``errno`` (code that catches ``OSError`` keeps working). :func:`check_writable` probes
a directory before long work, so that the user hears about it before the work, not after.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from moekit.errors import MoekitError

__all__ = [
    "WriteError",
    "check_writable",
    "is_disk_error",
    "make_dirs",
    "atomic_path",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_synced",
    "fsync_dir",
]


# What a write can hit that is the machine's state, not a bug: the user can free space or pick another directory.
_REASONS = {
    errno.ENOSPC: "no space left on the device (free some space, or write elsewhere)",
    errno.EDQUOT: "the disk quota is exceeded (free some space, or write elsewhere)",
    errno.EFBIG: "the file is too large for the file system",
    errno.EROFS: "the file system is read-only (write elsewhere)",
    errno.EACCES: "permission denied (write elsewhere, or fix the directory's permissions)",
    errno.EPERM: "operation not permitted (write elsewhere, or fix the directory's permissions)",
}


class WriteError(MoekitError, OSError):
    """Writing ``path`` failed because of the disk (full, read-only, no permission): one line naming it. An
    ``OSError`` too, with the cause's ``errno``; ``filename`` is ``path``."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path = str(path)
        self.reason = _REASONS.get(cause.errno, cause.strerror or str(cause))

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self) -> tuple:  # pickles (a worker's error crossing processes) despite the two-argument init
        return (type(self), (self.path, OSError(self.errno, self.strerror)))


# safetensors' writer (Rust) reports an I/O failure as its own SafetensorError, not an OSError; the errno is only in
# the message ("... No space left on device (os error 28) ...").
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


def _disk_errno(exc: BaseException) -> int | None:
    """The errno of a disk failure (see :class:`WriteError`) that ``exc`` reports, else None."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in _REASONS else None
    if type(exc).__name__ == "SafetensorError":
        match = _OS_ERROR_IN_MESSAGE.search(str(exc))
        if match and int(match.group(1)) in _REASONS:
            return int(match.group(1))
    return None


def is_disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a write failure caused by the disk or its permissions (see :class:`WriteError`): an
    ``OSError`` with one of their errnos, or safetensors' error wrapping one."""
    return _disk_errno(exc) is not None


def _as_write_error(exc: BaseException, path: Path, tmp: Path) -> BaseException:
    """``exc`` as a :class:`WriteError` naming ``path`` when it is a disk failure of writing ``tmp`` (or ``path``);
    else ``exc`` itself. An error about another file (the source of a copy that cannot be read) keeps its own
    message: only errors without a file name or naming the temporary / destination are the destination's."""
    code = _disk_errno(exc)
    if isinstance(exc, WriteError) or code is None:
        return exc
    name = getattr(exc, "filename", None)
    if name is not None and not (str(name).startswith(str(tmp)) or Path(os.fsdecode(name)) == path):
        return exc
    return WriteError(path, exc if isinstance(exc, OSError) else OSError(code, os.strerror(code)))


def _raise_as_write_error(exc: BaseException, path: Path, tmp: Path) -> NoReturn:
    """Raise ``exc`` again, as a :class:`WriteError` naming ``path`` where :func:`_as_write_error` makes it one."""
    converted = _as_write_error(exc, path, tmp)
    if converted is exc:
        raise exc
    raise converted from exc


def _remove(path: Path) -> None:
    """Remove a temporary file or directory; a failure to remove it (a read-only file system) must not hide the
    error that is being raised."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_writable(directory: str | os.PathLike) -> Path:
    """Check, before long work, that files can be written in ``directory`` (or, where it does not exist yet, in
    its nearest existing ancestor, where it would be created): a small file is written and removed again. A full
    disk, a read-only file system or a missing permission is a :class:`WriteError` naming ``directory``; a path
    whose ancestor is a file is a :class:`MoekitError`. Returns the directory that was probed.

    A probe cannot promise that the whole output fits (the disk may fill during the work); the writes themselves
    raise :class:`WriteError` then, and leave no partial file."""
    directory = Path(directory)
    probe_dir = directory
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise MoekitError(f"cannot write {directory}: {probe_dir} is not a directory")
    probe = _sibling(probe_dir / "probe", "tmp")
    try:
        # A few KiB, not an empty file: on a full disk creating an empty file usually still succeeds (a free inode),
        # writing its first block does not.
        with open(probe, "xb") as f:
            f.write(b"\0" * 4096)
            f.flush()
    except OSError as exc:
        _remove(probe)
        if is_disk_error(exc):
            raise WriteError(directory, exc) from None
        raise
    _remove(probe)
    return probe_dir


def make_dirs(directory: str | os.PathLike) -> Path:
    """``directory`` and its missing parents (``mkdir -p``), a full or read-only disk being a :class:`WriteError`
    naming it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_error(exc):
            raise WriteError(directory, exc) from None
        raise
    return directory


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
    except BaseException as exc:
        _remove(tmp)
        _raise_as_write_error(exc, path, tmp)
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
    try:
        tmp.mkdir()
    except OSError as exc:
        _raise_as_write_error(exc, path, tmp)
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
    except BaseException as exc:
        _remove(tmp)
        _raise_as_write_error(exc, path, tmp)
    if fsync:
        fsync_dir(path.parent)
