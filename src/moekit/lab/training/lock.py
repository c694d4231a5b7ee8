"""An exclusive lock on a run directory while a process trains it.

Two processes writing one run directory (two ``moekit train --run-dir X``, or ``--resume X`` while X still trains)
interleave ``metrics.jsonl`` and race on checkpoints. The lock is an ``fcntl.flock`` on ``RUN_DIR/.lock``: the
kernel releases it when the holder's process ends, however it ends (SIGKILL included), so a lock left by a dead
process never blocks anyone and needs no stale-lock detection. The holder writes its pid, host and start time into
the file, only so that the refused process can name it; the lock is the ``flock``, never the file's content.

``flock`` is advisory and per open file description; on Linux it also works on NFS (emulated with ``fcntl``
record locks). Where ``fcntl`` does not exist (Windows) the lock is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.atomic import WriteError, is_disk_error, make_dirs
from moekit.errors import MoekitError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunDirLocked", "hold_run_dir"]

LOCK_FILE = ".lock"


class RunDirLocked(MoekitError):
    """Another live process holds the run directory's lock."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"process {int(info['pid'])} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):  # holder still writing its details, or an odd file
        return "another process"


@contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` for the block (creating the directory when needed); a directory
    locked by a live process is refused with one line naming the holder (:class:`RunDirLocked`), before anything
    is written. A directory this call created and that holds nothing but the lock file when the block ends (a
    start that failed before writing anything) is removed again, so a failed start leaves nothing behind."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    make_dirs(run_dir)  # a full or read-only disk: one line naming the directory
    path = run_dir / LOCK_FILE
    # Opened without truncating: the holder's details must survive a refused process opening the file.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if created:  # nothing of this call's is left behind
            try:
                run_dir.rmdir()
            except OSError:
                pass
        if is_disk_error(exc):
            raise WriteError(path, exc) from None
        raise
    acquired = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirLocked(
                    f"{run_dir} is in use by {_holder_text(path)}: wait for it to finish or stop it"
                ) from None
        acquired = True
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:  # the details only name the holder in a refusal; the flock is the lock
            pass
        yield run_dir
    finally:
        # Removing the file while locked is safe here: other processes never wait for the lock (LOCK_NB), and
        # the directory goes with it, so none can be left locking an unlinked file that others do not see.
        if acquired and created and fcntl is not None and _only_lock(run_dir):
            path.unlink(missing_ok=True)
            try:
                run_dir.rmdir()
            except OSError:
                pass
        os.close(fd)


def _only_lock(run_dir: Path) -> bool:
    try:
        return [p.name for p in run_dir.iterdir()] == [LOCK_FILE]
    except OSError:
        return False
