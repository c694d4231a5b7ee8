"""``moekit validate``: every problem of a config in one error (exit 2, no traceback), the data source checked,
the memory estimate against the machine, and a warning for a warm-up longer than the run."""

from __future__ import annotations

from pathlib import Path

from moekit.lab.cli import main
from moekit.lab.training import size


def test_validate_reports_every_problem_of_a_file_at_once(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[moe]\nnum_experts = 4\ntop_k = 0\n\n[train]\nlr = inf\nthreads = 100000\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "moekit validate: error: 3 problems in the config:",
        "  moe.top_k must be a positive integer, got 0",
        "  train.lr must be a finite number > 0.0, got inf",
        "  train.threads must be an integer in [0, 1024], got 100000",
    ]


def test_validate_refuses_a_corpus_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.txt"
    assert main(["validate", "switch-tiny", "--set", f"data.corpus='{missing}'"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"moekit validate: error: data.corpus: corpus path {str(missing)!r} does not exist")


def test_validate_accepts_named_corpora_and_existing_paths(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n")
    for corpus in ("builtin", "sotu", str(text), str(tmp_path)):  # sotu is fetched when trained, not here
        assert main(["validate", "switch-tiny", "--set", f"data.corpus='{corpus}'"]) == 0, corpus
    assert "OK (MoE" in capsys.readouterr().out


def test_validate_refuses_an_image_directory_that_does_not_exist(tmp_path, capsys):
    config = Path(__file__).resolve().parents[3] / "configs" / "vit-top1.toml"
    missing = tmp_path / "no-images"
    assert main(["validate", str(config), "--set", f"data.dataset='{missing}'", "--set", "model.image_size=8",
                 "--set", "model.patch_size=2"]) == 2
    assert "data.dataset: image data directory" in capsys.readouterr().err


def test_validate_warns_when_warm_up_outlasts_the_run(capsys):
    assert main(["validate", "switch-tiny", "--set", "train.max_steps=20", "--set", "train.warmup_steps=20"]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert err.splitlines() == [
        "switch-tiny: warning: train.warmup_steps = 20 >= train.max_steps = 20: the run ends during warm-up, so the "
        "learning rate never reaches train.lr = 0.003 and the cosine schedule never starts"
    ]
    assert main(["validate", "switch-tiny", "--set", "train.max_steps=21", "--set", "train.warmup_steps=20"]) == 0
    assert capsys.readouterr().err == ""


def test_validate_refuses_a_model_too_large_for_the_machine(monkeypatch, capsys):
    monkeypatch.setattr(size, "available_memory", lambda: 8 * 2**30)
    assert main(["validate", "switch-tiny", "--set", "moe.num_experts=2147483648"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("moekit validate: error: the model is too large for this machine: training needs about ")
    assert "but 8.0 GiB of memory is available" in err[0]


def test_validate_prints_the_memory_estimate(monkeypatch, capsys):
    monkeypatch.setattr(size, "available_memory", lambda: 8 * 2**30)
    assert main(["validate", "switch-tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("memory to train: about 240.0 MiB (3,148,928 parameters: weights 12.0 MiB")
    assert lines[-1].endswith("; 8.0 GiB available")


def test_validate_names_a_missing_corpus_and_the_memory_together(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(size, "available_memory", lambda: 2**30)
    argv = ["validate", "switch-tiny", "--set", f"data.corpus='{tmp_path / 'nope'}'", "--set", "model.d_model=100000"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "moekit validate: error: 2 problems in the config:"
    assert err[1].startswith("  data.corpus: corpus path") and err[2].startswith("  the model is too large")
