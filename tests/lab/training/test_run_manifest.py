"""The files a run depends on are verified, never rebuilt behind the user's back (issue 18): ``config.toml``,
``tokenizer.json`` and ``data/tokens.safetensors`` are recorded in ``run_manifest.json`` when the run starts; eval,
generate, analyze and resume refuse a missing or changed one in one line naming it; a hand-edited ``config.toml`` is
refused on resume (changes go through ``--set``, which is logged); a run made before manifests is accepted."""

from __future__ import annotations

import hashlib
import json

import pytest

from moekit.lab.cli import main
from moekit.lab.training.run import MANIFEST_FILE, train_run
from moekit.training.metrics import read_metrics

FILES = ("config.toml", "tokenizer.json", "data/tokens.safetensors")



def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_new_run_records_its_files(trained):
    run_dir, _ = trained
    entries = json.loads((run_dir / MANIFEST_FILE).read_text())["sha256"]
    assert set(entries) == set(FILES)
    for name in FILES:
        assert entries[name] == hashlib.sha256((run_dir / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["data/tokens.safetensors", "tokenizer.json"])
def test_a_missing_data_file_is_an_error_never_a_rebuild(trained, capsys, name):
    run_dir, _ = trained
    (run_dir / name).unlink()
    capsys.readouterr()
    for argv in (["eval", str(run_dir)], ["train", "--resume", str(run_dir)]):
        assert main(argv) == 2
        line = _error(capsys)
        assert name in line and "is missing" in line and "never rebuilt" in line
        assert not (run_dir / name).exists()
    # a run made before manifests: still an error, still no rebuild
    (run_dir / MANIFEST_FILE).unlink()
    assert main(["eval", str(run_dir)]) == 2
    assert name in _error(capsys)
    assert not (run_dir / name).exists()


def test_a_flipped_bit_in_the_tokens_is_caught(trained, capsys):
    run_dir, _ = trained
    path = run_dir / "data/tokens.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the validation token ids: the file still loads
    path.write_bytes(bytes(data))
    capsys.readouterr()
    generate = ["generate", str(run_dir), "--prompt", "the"]
    for argv in (["eval", str(run_dir)], generate, ["train", "--resume", str(run_dir)]):
        assert main(argv) == 2
        line = _error(capsys)
        assert "tokens.safetensors fails its sha256 checksum" in line


def test_a_hand_edited_config_is_refused_on_resume_and_set_is_logged(trained, capsys):
    run_dir, cfg = trained
    config = run_dir / "config.toml"
    original = config.read_text()
    config.write_text(original.replace("lr = 0.003", "lr = 0.03"))
    assert original != config.read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--set", "train.max_steps=12"]) == 2
    line = _error(capsys)
    assert "config.toml was edited since the run started" in line and "--set" in line
    assert max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl")) == 8  # nothing trained
    config.write_text(original)
    assert main(["train", "--resume", str(run_dir), "--set", "train.max_steps=12"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changed values: train.max_steps = 12 (was 8)" in err
    assert max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl")) == 12
    # the manifest follows the config the resume rewrote: the run still verifies
    assert "max_steps = 12" in config.read_text()
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0


def test_a_run_without_a_manifest_is_accepted_silently(trained, capsys):
    run_dir, _ = trained
    (run_dir / MANIFEST_FILE).unlink()
    messages: list[str] = []
    train_run(None, run_dir, resume=True, log=messages.append)
    assert [m.split(" ")[:2] for m in messages] == [["resumed", "from"]], messages  # nothing else said
    assert not (run_dir / MANIFEST_FILE).exists()
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0
