"""A language-model run's prepared data (issue 18): data a failed start left behind is never paired with a retry's
other ``[data]`` section; a damaged token file and token ids outside the vocabulary are one line naming the file
(with and without the run manifest); a full or read-only run directory is one line, found before the corpus is
read where it can be, and leaves no partial file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save as np_save
from tiny_lm import tiny_config_text
from tokenizers import Tokenizer

from moekit.atomic import WriteError
from moekit.lab.cli import main
from moekit.lab.training import tasks
from moekit.lab.training.run import MANIFEST_FILE, train_run
from moekit.lab.training.run_config import load_run_config
from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE, LanguageModelTask, prepare_data

_as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


def _config(tmp_path: Path, corpus: Path, name: str = "tiny", vocab_size: int = 300, **train: object):
    path = tmp_path / f"{name}.toml"
    text = tiny_config_text(corpus, **{"max_steps": 2, "eval_every": 2, "checkpoint_every": 2, **train})
    path.write_text(text.replace("vocab_size = 300", f"vocab_size = {vocab_size}"))
    return path


def _one_error_line(capsys) -> str:
    """The error line of a failed command: the last line of stderr, the only one that reports an error, after
    the log lines of the work done before it (no traceback)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return lines[-1]


def _tokens(run_dir: Path) -> dict[str, np.ndarray]:
    with safe_open(str(run_dir / TOKENS_FILE), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 2-step run, copied by each test that damages it."""
    from tiny_lm import write_tiny_corpus

    root = tmp_path_factory.mktemp("trained")
    corpus = write_tiny_corpus(root / "corpus.txt")
    run_dir = root / "run"
    train_run(load_run_config(_config(root, corpus)), run_dir, log=lambda m: None)
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    return run_dir


# -- 1. a failed start's data is never a retry's ----------------------------------------------------------------


def _fail_after_data(monkeypatch) -> None:
    """A start that fails after its data is prepared and before config.toml and the first checkpoint."""

    def boom(self, config, data):
        raise RuntimeError("injected failure after data preparation")

    monkeypatch.setattr(LanguageModelTask, "eval_data", boom)


def test_a_retry_with_another_vocab_size_does_not_reuse_a_failed_starts_data(tmp_path, tiny_corpus, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_after_data(m)
        with pytest.raises(RuntimeError, match="injected"):
            train_run(load_run_config(_config(tmp_path, tiny_corpus)), run_dir, log=lambda msg: None)
    assert (run_dir / TOKENS_FILE).is_file() and not (run_dir / "config.toml").exists()  # the leftovers
    lines: list[str] = []
    summary = train_run(load_run_config(_config(tmp_path, tiny_corpus, "b", vocab_size=400)), run_dir,
                        log=lines.append)
    assert summary["steps"] == 2
    assert any("discarding the data a failed start left" in line and "data.vocab_size = 300 (now 400)" in line
               for line in lines)
    # The retry's data is exactly what a clean start with vocab_size = 400 prepares.
    clean = tmp_path / "clean"
    prepare_data(load_run_config(_config(tmp_path, tiny_corpus, "b", vocab_size=400)), clean, lambda msg: None)
    for name, ids in _tokens(clean).items():
        np.testing.assert_array_equal(_tokens(run_dir)[name], ids)
    assert (run_dir / TOKENIZER_FILE).read_bytes() == (clean / TOKENIZER_FILE).read_bytes()
    assert Tokenizer.from_file(str(run_dir / TOKENIZER_FILE)).get_vocab_size() > 300


def test_a_retry_with_the_same_data_section_reuses_the_failed_starts_data(tmp_path, tiny_corpus, monkeypatch):
    run_dir = tmp_path / "run"
    config = load_run_config(_config(tmp_path, tiny_corpus))
    with monkeypatch.context() as m:
        _fail_after_data(m)
        with pytest.raises(RuntimeError):
            train_run(config, run_dir, log=lambda msg: None)
    before = (run_dir / TOKENS_FILE).read_bytes()
    lines: list[str] = []
    data = prepare_data(config, run_dir, lines.append)
    assert lines == []  # neither a corpus line (no rebuild) nor a discard line
    assert (run_dir / TOKENS_FILE).read_bytes() == before
    assert data.vocab_size == Tokenizer.from_file(str(run_dir / TOKENIZER_FILE)).get_vocab_size()


def test_the_token_file_records_the_data_section_and_its_tokenizer(run_copy):
    with safe_open(str(run_copy / TOKENS_FILE), framework="np") as f:
        record = json.loads(f.metadata()["moekit.data"])
    assert record["vocab_size"] == 300 and record["piece_chars"] == 512 and record["sentinels"] == 0
    import hashlib

    assert record["tokenizer_sha256"] == hashlib.sha256((run_copy / TOKENIZER_FILE).read_bytes()).hexdigest()


def _without_manifest(run_dir: Path) -> None:
    (run_dir / MANIFEST_FILE).unlink()  # a run made before manifests: the token file is checked on its own


def test_a_run_whose_data_records_another_data_section_is_refused(run_copy, tmp_path, capsys):
    _without_manifest(run_copy)
    config = run_copy / "config.toml"
    config.write_text(config.read_text().replace("vocab_size = 300", "vocab_size = 400"))
    assert main(["eval", str(run_copy)]) == 2
    line = _one_error_line(capsys)
    assert f"{run_copy / TOKENS_FILE} was prepared for another [data] section" in line
    assert "data.vocab_size = 300 (now 400)" in line


def test_a_run_whose_tokenizer_is_not_its_tokens_is_refused(run_copy, tmp_path, capsys):
    _without_manifest(run_copy)
    other = Tokenizer.from_file(str(run_copy / TOKENIZER_FILE))
    other.add_tokens(["<an extra token>"])
    other.save(str(run_copy / TOKENIZER_FILE))
    assert main(["eval", str(run_copy)]) == 2
    assert f"{run_copy / TOKENIZER_FILE} is not the tokenizer" in _one_error_line(capsys)


def test_old_data_without_a_record_is_reused_in_a_run_and_rebuilt_without_one(run_copy, tmp_path):
    arrays = _tokens(run_copy)
    (run_copy / TOKENS_FILE).write_bytes(np_save(arrays))  # as an older moekit wrote it: no metadata
    _without_manifest(run_copy)
    config = load_run_config(run_copy / "config.toml")
    lines: list[str] = []
    data = prepare_data(config, run_copy, lines.append)  # a run: its data, as before
    assert lines == [] and np.array_equal(data.val_tokens, arrays["val"])
    (run_copy / "config.toml").unlink()  # no run: whose data it is cannot be told, so it is prepared again
    prepare_data(config, run_copy, lines.append)
    assert "without a record of its [data] section" in lines[0]
    assert "moekit.data" in safe_open(str(run_copy / TOKENS_FILE), framework="np").metadata()


# -- 2. a damaged token file, ids out of range: one line naming the file ----------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # inside the JSON header
    path.write_bytes(bytes(data))


def _huge_header_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(data))


def _commands(run_dir: Path) -> list[list[str]]:
    return [["eval", str(run_dir)], ["generate", str(run_dir), "--prompt", "the"], ["train", "--resume", str(run_dir)]]


@pytest.mark.parametrize("damage", [_truncate, _damage_header, _huge_header_length])
def test_a_damaged_token_file_is_one_line_with_and_without_the_manifest(run_copy, capsys, damage):
    path = run_copy / TOKENS_FILE
    damage(path)
    capsys.readouterr()
    for argv in _commands(run_copy):  # the manifest catches it first
        assert main(argv) == 2
        assert f"{path} fails its sha256 checksum" in _one_error_line(capsys)
    _without_manifest(run_copy)
    for argv in _commands(run_copy):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"moekit {argv[0]}: error: {path} cannot be read (")
        assert line.endswith("it is damaged; restore it from a backup")


def _rewrite_tokens(run_dir: Path, change) -> None:
    """Rewrite the token file with ``change(arrays)`` applied, keeping its metadata: damage the checksums would
    not see in a run made before manifests."""
    path = run_dir / TOKENS_FILE
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    path.write_bytes(np_save(change(arrays), metadata=meta))


@pytest.mark.parametrize("where,value", [("train", "vocab"), ("val", "vocab"), ("train", -1), ("val", 10**6)])
def test_token_ids_outside_the_vocabulary_are_one_line(run_copy, capsys, where, value):
    _without_manifest(run_copy)
    vocab = Tokenizer.from_file(str(run_copy / TOKENIZER_FILE)).get_vocab_size()
    bad = vocab if value == "vocab" else value

    def change(arrays):
        arrays[where] = arrays[where].copy()
        arrays[where][len(arrays[where]) // 2] = bad
        return arrays

    _rewrite_tokens(run_copy, change)
    capsys.readouterr()
    for argv in _commands(run_copy):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert f"{run_copy / TOKENS_FILE}: token id {bad} in its {where!r} array is outside the vocabulary" in line
        assert f"(ids 0..{vocab - 1})" in line


@pytest.mark.parametrize("change,message", [
    (lambda a: {"train": a["train"]}, "has no 'val' token array"),
    (lambda a: {**a, "train": a["train"].astype(np.float32)}, "'train' array (float32, shape"),
    (lambda a: {**a, "val": a["val"].reshape(1, -1)}, "'val' array (int32, shape (1,"),
])
def test_a_malformed_token_file_is_one_line(run_copy, capsys, change, message):
    _without_manifest(run_copy)
    _rewrite_tokens(run_copy, change)
    capsys.readouterr()
    assert main(["eval", str(run_copy)]) == 2
    line = _one_error_line(capsys)
    assert str(run_copy / TOKENS_FILE) in line and message in line


# -- 3. a full or read-only run directory -----------------------------------------------------------------------


def _refuse_corpus(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the corpus was read although the run directory cannot be written")

    monkeypatch.setattr(tasks, "load_corpus", never)


def test_a_full_disk_is_found_before_the_corpus_is_read(tmp_path, tiny_corpus, monkeypatch, capsys):
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "x" in mode:  # the probe's file
            def full(data):
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = full
        return f

    _refuse_corpus(monkeypatch)
    monkeypatch.setattr("builtins.open", full_open)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, tiny_corpus)), "--run-dir", str(run_dir)]) == 2
    assert _one_error_line(capsys) == (
        f"moekit train: error: cannot write {run_dir}: no space left on the device (free some space, or write "
        "elsewhere)"
    )
    assert not run_dir.exists()  # the lock's directory is removed again


def test_a_disk_that_fills_while_the_data_is_written_leaves_no_partial_file(tmp_path, tiny_corpus, monkeypatch,
                                                                           capsys):
    from moekit import atomic

    real = Path.write_bytes

    def fill(self, data):
        if self.name.startswith(f".tmp-{Path(TOKENIZER_FILE).name}"):  # the tokens are written, the tokenizer not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(atomic.Path, "write_bytes", fill)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, tiny_corpus)), "--run-dir", str(run_dir)]) == 2
    assert _one_error_line(capsys) == (
        f"moekit train: error: cannot write {run_dir / TOKENIZER_FILE}: no space left on the device (free some "
        "space, or write elsewhere)"
    )
    assert not run_dir.exists()  # no tokens without their tokenizer, no temporaries, no empty data/


def test_a_full_disk_in_safetensors_terms_is_recognised(tmp_path, tiny_corpus, monkeypatch):
    from safetensors import SafetensorError

    from moekit import atomic

    def fail(self, data):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(atomic.Path, "write_bytes", fail)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(WriteError, match=f"cannot write {run_dir / TOKENS_FILE}: no space left"):
        prepare_data(load_run_config(_config(tmp_path, tiny_corpus)), run_dir, lambda m: None)
    assert list(run_dir.iterdir()) == []


@_as_root
def test_a_read_only_run_directory_is_refused_before_the_corpus_is_read(tmp_path, tiny_corpus, monkeypatch):
    _refuse_corpus(monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        with pytest.raises(WriteError, match=f"cannot write {run_dir}: permission denied"):
            prepare_data(load_run_config(_config(tmp_path, tiny_corpus)), run_dir, lambda m: None)
        assert list(run_dir.iterdir()) == []
    finally:
        run_dir.chmod(0o755)


# -- 4. data.tokenizer_file: runs on different corpora share one vocabulary ---------------------------------------


def test_a_given_tokenizer_file_encodes_another_corpus_with_that_vocabulary(trained_run, tmp_path):
    from moekit.lab.data.split import cut_pieces, split_pieces
    from moekit.lab.data.tokenizer import encode_pieces

    other = tmp_path / "other.txt"
    text = "".join(f"Line {i}: the other corpus speaks of ships, whales and the sea.\n" for i in range(400))
    other.write_text(text, encoding="utf-8")
    given = trained_run / TOKENIZER_FILE
    path = _config(tmp_path, other)
    path.write_text(path.read_text().replace("[data]\n", f"[data]\ntokenizer_file = \"{given}\"\n"))
    config = load_run_config(path)
    run_dir = tmp_path / "run"
    data = prepare_data(config, run_dir, lambda msg: None)
    tok = Tokenizer.from_file(str(given))
    # The run keeps its own copy of the given tokenizer: the same vocabulary, not one trained on this corpus.
    assert Tokenizer.from_file(str(run_dir / TOKENIZER_FILE)).get_vocab() == tok.get_vocab()
    assert data.vocab_size == tok.get_vocab_size()
    # Its token arrays are the given tokenizer's encoding of this corpus' split, end-of-text after each document.
    train_pieces, val_pieces = split_pieces(cut_pieces([text], config.data.piece_chars), config.data.val_fraction)
    np.testing.assert_array_equal(_tokens(run_dir)["train"], encode_pieces(tok, train_pieces))
    np.testing.assert_array_equal(_tokens(run_dir)["val"], encode_pieces(tok, val_pieces))
    with safe_open(str(run_dir / TOKENS_FILE), framework="np") as f:
        assert json.loads(f.metadata()["moekit.data"])["tokenizer_file"] == str(given)
    # A run trains on it, and its data is reused as it was prepared.
    summary = train_run(config, run_dir, log=lambda m: None)
    assert summary["steps"] == 2


def test_a_missing_tokenizer_file_is_one_line_before_the_corpus_is_read(tmp_path, tiny_corpus, capsys, monkeypatch):
    path = _config(tmp_path, tiny_corpus)
    path.write_text(path.read_text().replace("[data]\n", "[data]\ntokenizer_file = \"no/such/tokenizer.json\"\n"))
    monkeypatch.setattr(tasks, "load_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) != 0
    assert "tokenizer file no/such/tokenizer.json is missing" in _one_error_line(capsys)
    assert not (tmp_path / "run" / TOKENS_FILE).exists()


def test_a_tokenizer_file_without_an_end_of_text_token_is_one_line(tmp_path, tiny_corpus, capsys):
    from tokenizers import models

    bare = tmp_path / "bare.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(bare))
    path = _config(tmp_path, tiny_corpus)
    path.write_text(path.read_text().replace("[data]\n", f"[data]\ntokenizer_file = \"{bare}\"\n"))
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) != 0
    assert "has no <|endoftext|> token" in _one_error_line(capsys)


def test_a_tokenizer_file_is_refused_with_an_imported_tokenizer():
    from moekit.errors import ConfigError
    from moekit.lab.data.config import DataConfig

    with pytest.raises(ConfigError, match="data.tokenizer_file is for data.tokenizer"):
        DataConfig(tokenizer="imported", tokenizer_file="tok.json")
    with pytest.raises(ConfigError, match="must be a file path"):
        DataConfig(tokenizer_file="  ")
