"""The train / eval / generate / validate commands: exit codes, one-line errors, and what they print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_lm import tiny_config_text

from moekit.lab.cli import main

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.fixture
def trained_run(tmp_path, tiny_corpus, capsys) -> Path:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(tiny_corpus, max_steps=12, checkpoint_every=4, eval_every=6))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir)]) == 0
    (tmp_path / "train_stdout.txt").write_text(capsys.readouterr().out)
    return run_dir


def test_train_writes_the_run_directory_and_prints_it(trained_run, capsys):
    out = (trained_run.parent / "train_stdout.txt").read_text()
    assert f"run directory: {trained_run}" in out and "unigram baseline" in out
    names = {p.name for p in trained_run.iterdir()}
    assert {
        "config.toml",
        "metrics.jsonl",
        "checkpoints",
        "tokenizer.json",
        "plots",
        "summary.json",
        "data",
    } <= names
    assert {p.name for p in (trained_run / "plots").iterdir()} == {"loss.png", "expert_load.png", "load_balance.png"}
    assert (trained_run / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    first = records[0]
    for key in (
        "loss",
        "ce_loss",
        "lb_loss",
        "z_loss",
        "drop_fraction",
        "tokens_per_expert",
        "grad_norm",
        "tokens_per_s",
        "skipped_steps",
        "lr",
    ):
        assert key in first, key
    assert len(first["tokens_per_expert"]) == 1 and len(first["tokens_per_expert"][0]) == 4
    assert "val_loss" in records[5] and "val_loss" in records[11] and "val_loss" not in records[0]
    # capacity C = max(4, ceil(1.25 * 4*16 / 4)) = 20 per expert: kept tokens never exceed it
    assert all(max(r["tokens_per_expert"][0]) <= 20 for r in records)
    # only the newest 3 checkpoints are kept: 4, 8, 12
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == [
        "step_00000004",
        "step_00000008",
        "step_00000012",
    ]


def test_eval_reports_a_corrupted_checkpoint_and_uses_the_previous(trained_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained_run)]) == 0
    good = capsys.readouterr().out
    assert "checkpoint step_00000012 (step 12): validation loss" in good and "perplexity" in good
    target = trained_run / "checkpoints" / "step_00000012" / "model.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))
    assert main(["eval", str(trained_run)]) == 0
    captured = capsys.readouterr()
    assert f"{target} fails its sha256 checksum" in captured.err
    assert "checkpoint step_00000008 (step 8)" in captured.out
    # with every checkpoint corrupted the command fails with one line
    for step in (4, 8):
        (trained_run / "checkpoints" / f"step_{step:08d}" / "state.json").write_text("{}")
    assert main(["eval", str(trained_run)]) == 2
    assert "no checkpoint" in capsys.readouterr().err.splitlines()[-1]


def test_generate_continues_the_prompt(trained_run, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(trained_run),
                "--prompt",
                "The cat",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("The cat") and len(text.rstrip("\n")) > len("The cat")


def test_resume_continues_to_a_larger_max_steps(trained_run, capsys):
    assert main(["train", "--resume", str(trained_run), "--set", "train.max_steps=14"]) == 0
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 15))
    assert main(["train", "--resume", str(trained_run), "--set", "model.d_model=64"]) == 2
    assert "only train.* and parallel.* overrides" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["validate", "nope.toml"], "config file 'nope.toml' not found"),
        (
            ["validate", str(CONFIGS / "switch-tiny.toml"), "--set", "train.batchsize=2"],
            "did you mean 'batch_size'",
        ),
        (["train", "--set", "moe.router='expert_choice'"], "refused in the causal TransformerLM"),
        (["train", "--set", "data.corpus='/no/such/dir'", "--run-dir", "RUN"], "does not exist"),
        (["eval", "/no/such/run"], "does not exist"),
        (["generate", "/no/such/run", "--prompt", "x"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_binary_corpus_fails_before_training(tmp_path, capsys):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 10)
    assert main(["train", "--set", f"data.corpus='{blob}'", "--run-dir", str(tmp_path / "r")]) == 2
    assert "looks binary" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_validate_prints_counts_and_python_m_works():
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "validate", str(CONFIGS / "switch-tiny.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK (MoE: 8 experts, top-1, MoE blocks [1, 3])" in proc.stdout
    assert "3,148,928 total, 1,313,920 active per token" in proc.stdout
