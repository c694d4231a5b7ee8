"""A run directory in use is locked (issue 18): a second process training it is refused in one line naming the
holder, and writes nothing; once the holder is gone (however it ended) the directory can be trained again."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from tiny_lm import tiny_config_text

from moekit.lab.cli import main
from moekit.lab.training.lock import LOCK_FILE
from moekit.training.metrics import read_metrics


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of ``run_dir`` (but the lock file) with its sha256: what 'wrote nothing' is checked against."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }



def test_a_locked_run_dir_is_refused_in_one_line_and_left_untouched(trained, capsys):
    run_dir, _ = trained
    before = _snapshot(run_dir)
    # Another holder: a second open file description of the lock file (flock locks belong to one), with the
    # details a holder writes.
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": 4242, "host": "node7", "since": time.time()}).encode(), 0)
        capsys.readouterr()
        rc = main(["train", "--resume", str(run_dir), "--set", "train.max_steps=12"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2
        assert len(err) == 1 and "in use by process 4242 on node7 (since " in err[0], err
        assert _snapshot(run_dir) == before
        # a new run into the same directory is refused too (it already holds a run)
        assert main(["train", "--config", str(trained[1]), "--run-dir", str(run_dir)]) == 2
        assert _snapshot(run_dir) == before
        assert _snapshot(run_dir) == before
    finally:
        os.close(fd)  # the holder goes away (as a dead process's lock does)
    rc = main(["train", "--resume", str(run_dir), "--set", "train.max_steps=12"])
    assert rc == 0
    assert max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl")) == 12
    # the lock file names its last holder: this process
    info = json.loads((run_dir / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()


def test_a_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(tmp_path / "no-such-corpus.txt"))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir)]) == 2
    assert not run_dir.exists()


def test_a_new_run_into_a_locked_directory_is_refused(tmp_path, tiny_corpus, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(tiny_corpus))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir)]) == 2
        assert "is in use by" in capsys.readouterr().err
        assert [p.name for p in run_dir.iterdir()] == [LOCK_FILE]
    finally:
        os.close(fd)



def test_a_full_disk_at_the_lock_is_one_line_naming_it(tmp_path, monkeypatch):
    """ENOSPC creating the lock file is a WriteError (a MoekitError: one line) naming the lock, and the directory
    this call created is not left behind."""
    import errno

    from moekit.atomic import WriteError
    from moekit.lab.training import lock as lock_mod

    real_open = lock_mod.os.open

    def full(path, *args, **kwargs):
        if str(path).endswith(lock_mod.LOCK_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(lock_mod.os, "open", full)
    with pytest.raises(WriteError, match="no space left") as info:
        with lock_mod.hold_run_dir(tmp_path / "run"):
            pass
    assert info.value.path == str(tmp_path / "run" / lock_mod.LOCK_FILE)
    assert not (tmp_path / "run").exists()
