"""``moekit analyze --out`` and ``moekit compare --out`` on a full or read-only disk (issue 18): one line naming the
directory, found before the model is traced or anything trains; a disk that fills while the output is written is
one line naming the file, and leaves no half-written file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from tiny_lm import tiny_config_text, write_tiny_corpus

from moekit.analysis.trace import RoutingTrace
from moekit.atomic import WriteError
from moekit.lab.analysis import pipeline
from moekit.lab.cli import main
from moekit.lab.training.compare import FAILED_FILE, compare
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config

_as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
FULL = "no space left on the device (free some space, or write elsewhere)"


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _config(tmp: Path, corpus: Path) -> Path:
    path = tmp / "tiny.toml"
    path.write_text(tiny_config_text(corpus, max_steps=2, eval_every=2, checkpoint_every=2))
    return path


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("moe")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    run_dir = tmp / "run"
    train_run(load_run_config(_config(tmp, corpus)), run_dir, log=lambda m: None)
    return run_dir


@pytest.fixture
def full_probe(monkeypatch):
    """The disk is full: the writability probe's first block does not fit (other files still open normally)."""
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "x" in mode:
            def full(data):
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = full
        return f

    monkeypatch.setattr("builtins.open", full_open)


@pytest.fixture
def never_trace(monkeypatch):
    def trace(*args, **kwargs):
        raise AssertionError("the model was traced although --out cannot be written")

    monkeypatch.setattr(pipeline, "trace_model", trace)


def _analyze(run_dir: Path, out: Path) -> int:
    return main(["analyze", str(run_dir), "--out", str(out), "--max-tokens", "64", "--permutations", "2"])


def test_analyze_on_a_full_disk_stops_before_tracing(moe_run, tmp_path, capsys, full_probe, never_trace):
    out = tmp_path / "analysis"
    assert _analyze(moe_run, out) == 2
    assert _error_line(capsys) == f"moekit analyze: error: cannot write {out}: {FULL}"
    assert list(tmp_path.iterdir()) == []


@_as_root
def test_analyze_into_a_read_only_directory_stops_before_tracing(moe_run, tmp_path, capsys, never_trace):
    tmp_path.chmod(0o555)
    try:
        assert _analyze(moe_run, tmp_path / "analysis") == 2
        assert _error_line(capsys) == f"moekit analyze: error: cannot write {tmp_path / 'analysis'}: permission " \
                                      "denied (write elsewhere, or fix the directory's permissions)"
        assert list(tmp_path.iterdir()) == []
    finally:
        tmp_path.chmod(0o755)


def test_analyze_on_a_disk_that_fills_while_writing_leaves_no_partial_file(moe_run, tmp_path, capsys, monkeypatch):
    real = RoutingTrace.write_jsonl

    def half_then_full(self, path, *args, **kwargs):
        Path(path).write_text('{"index": 0, "wind')  # part of the first row, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RoutingTrace, "write_jsonl", half_then_full)
    out = tmp_path / "analysis"
    assert _analyze(moe_run, out) == 2
    assert _error_line(capsys) == f"moekit analyze: error: cannot write {out / 'trace.jsonl'}: {FULL}"
    assert list(out.iterdir()) == []  # no trace.jsonl, no temporary
    monkeypatch.setattr(RoutingTrace, "write_jsonl", real)
    assert _analyze(moe_run, out) == 0  # space freed: the same command completes
    assert {"trace.jsonl", "trace.safetensors", "analysis.json", "report.html"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_analyze_report_write_on_a_full_disk_names_the_report(moe_run, tmp_path, capsys, monkeypatch):
    from moekit import atomic

    real = Path.write_bytes

    def fill(self, data):
        if self.name.startswith(".tmp-report.html"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(atomic.Path, "write_bytes", fill)
    out = tmp_path / "analysis"
    assert _analyze(moe_run, out) == 2
    assert _error_line(capsys) == f"moekit analyze: error: cannot write {out / 'report.html'}: {FULL}"
    assert not (out / "report.html").exists() and not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def never_train(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("a run trained although --out cannot be written")

    monkeypatch.setattr("moekit.lab.runtime.train_run_with_threads", train)


def test_compare_on_a_full_disk_stops_before_training(tmp_path, tiny_corpus, capsys, full_probe, never_train):
    out = tmp_path / "out"
    assert main(["compare", str(_config(tmp_path, tiny_corpus)), "--out", str(out)]) == 2
    assert _error_line(capsys) == f"moekit compare: error: cannot write {out}: {FULL}"
    assert not out.exists()


@_as_root
def test_compare_into_a_read_only_directory_stops_before_training(tmp_path, tiny_corpus, capsys, never_train):
    config = _config(tmp_path, tiny_corpus)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["compare", str(config), "--out", str(ro / "out")]) == 2
        assert _error_line(capsys) == f"moekit compare: error: cannot write {ro / 'out'}: permission denied " \
                                      "(write elsewhere, or fix the directory's permissions)"
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_full_disk_during_a_compared_run_stops_the_comparison_without_marking_the_run_failed(tmp_path,
                                                                                               tiny_corpus):
    def train(cfg, run_dir, *, resume, log):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # it had started training
        raise WriteError(run_dir / "checkpoints", OSError(errno.ENOSPC, "No space left on device"))

    out = tmp_path / "out"
    with pytest.raises(WriteError, match="no space left"):
        compare([str(_config(tmp_path, tiny_corpus))], out_dir=out, log=lambda m: None, train=train)
    # Not recorded as the config's failure (a rerun after freeing space trains it instead of skipping it).
    assert not list(out.rglob(FAILED_FILE))
