"""``moekit analyze`` and ``moekit distill`` end to end on tiny runs (seconds), and their one-line errors."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tiny_lm import tiny_config_text, write_tiny_corpus  # tests/training is on sys.path (conftest)

from moekit.lab.cli import main
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import build_run_config, tomllib


def _train(tmp: Path, name: str, corpus: Path, dense: bool = False, copy_data_from: Path | None = None) -> Path:
    text = tiny_config_text(corpus, max_steps=8)
    if dense:
        text = text.split("[moe]")[0] + "[data]" + text.split("[data]")[1]
    cfg = build_run_config(tomllib.loads(text))
    run_dir = tmp / name
    if copy_data_from is not None:  # the same tokenizer and tokens, as a real baseline needs
        (run_dir / "data").mkdir(parents=True)
        shutil.copy(copy_data_from / "tokenizer.json", run_dir / "tokenizer.json")
        shutil.copy(copy_data_from / "data/tokens.safetensors", run_dir / "data/tokens.safetensors")
    train_run(cfg, run_dir, log=lambda m: None)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    moe = _train(tmp, "moe", corpus)
    dense = _train(tmp, "dense", corpus, dense=True, copy_data_from=moe)
    return {"moe": moe, "dense": dense, "corpus": corpus, "tmp": tmp}


def test_analyze_writes_trace_and_report(runs, capsys):
    out = runs["tmp"] / "an"
    assert main(["analyze", str(runs["moe"]), "--out", str(out), "--max-tokens", "256", "--permutations", "5"]) == 0
    printed = capsys.readouterr().out
    assert "block 1:" in printed and "report:" in printed
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["num_tokens"] == 256 and len(summary["layers"]) == 1
    lines = (out / "trace.jsonl").read_text().splitlines()
    assert len(lines) == 256 and "category" in json.loads(lines[0])
    assert (out / "trace.safetensors").stat().st_size > 0

    class Text(HTMLParser):
        chunks: list[str] = []

        def handle_data(self, data):
            self.chunks.append(data)

    p = Text()
    p.feed((out / "report.html").read_text())
    text = " ".join(p.chunks)
    assert all(f"block 1 expert {e}" in text for e in range(4))


def test_analyze_other_text(runs):
    out = runs["tmp"] / "an-text"
    assert main(["analyze", str(runs["moe"]), "--data", str(runs["corpus"]), "--out", str(out),
                 "--max-tokens", "128", "--permutations", "5"]) == 0
    assert json.loads((out / "analysis.json").read_text())["data"] == str(runs["corpus"])


def test_distill_reports_gain_and_ratio(runs, capsys):
    student = runs["tmp"] / "student"
    rc = main(["distill", str(runs["moe"]), "--init", "top", "--dense-baseline", str(runs["dense"]),
               "--set", "train.max_steps=3", "--run-dir", str(student)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "share of the teacher's gain kept" in printed and "parameters" in printed
    info = json.loads((student / "distill.json").read_text())
    assert info["steps"] == 3 and info["init"] == "top" and info["hard_weight"] == 0.75
    assert 0 < info["parameter_ratio"] < 1
    assert info["dense_baseline_val_loss"] is not None
    # The student run is an ordinary dense run: moekit eval loads it.
    assert main(["eval", str(student), "--batches", "1"]) == 0


def _one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bad_input_is_a_one_line_error(runs, capsys, tmp_path):
    _one_line_error(capsys, ["analyze", str(tmp_path / "nope")], "does not exist")
    _one_line_error(capsys, ["analyze", str(runs["dense"])], "dense model")
    _one_line_error(capsys, ["distill", str(runs["dense"])], "MoE teacher")
    _one_line_error(capsys, ["distill", str(runs["moe"]), "--set", "model.d_model=64"], "train.*")
    _one_line_error(capsys, ["distill", str(runs["moe"]), "--hard-weight", "1.5"], "label weight")
    _one_line_error(capsys, ["distill", str(runs["moe"]), "--dense-baseline", str(runs["moe"])], "not a dense")
    # A flipped byte in the newest checkpoint: refused (no silent analysis of an older model) ...
    broken = tmp_path / "broken"
    shutil.copytree(runs["moe"], broken)
    newest = sorted((broken / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    _one_line_error(capsys, ["analyze", str(broken), "--out", str(tmp_path / "a")], "checksum")
    _one_line_error(capsys, ["distill", str(broken), "--run-dir", str(tmp_path / "s")], "checksum")
    # ... unless asked to fall back to the newest checkpoint that passes.
    assert main(["analyze", str(broken), "--fallback", "--out", str(tmp_path / "a"), "--max-tokens", "64",
                 "--permutations", "2"]) == 0
