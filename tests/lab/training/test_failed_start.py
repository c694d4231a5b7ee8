"""A new run that fails before its first checkpoint leaves nothing a retry could take for a started run: no
``config.toml``, ``run_manifest.json`` or ``metrics.jsonl`` (its data files stay, recording the [data] section they
were made from), so a retry with another config starts afresh instead of being refused or resuming the old config."""

from __future__ import annotations

import pytest
from tiny_lm import tiny_config_text, write_tiny_corpus  # tests/training is on sys.path (conftest)

from moekit.lab.training import run as run_module
from moekit.lab.training.run import read_run_config, train_run
from moekit.lab.training.run_config import load_run_config


def test_a_start_that_fails_before_its_first_checkpoint_can_be_retried_with_another_config(tmp_path, monkeypatch):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(corpus, max_steps=2, checkpoint_every=2))
    run_dir = tmp_path / "run"
    real_fit = run_module.Trainer.fit

    def fail_in_the_first_step(self):
        (self.run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # as a first logged step would
        raise RuntimeError("injected: out of memory in step 1")

    monkeypatch.setattr(run_module.Trainer, "fit", fail_in_the_first_step)
    with pytest.raises(RuntimeError, match="injected"):
        train_run(load_run_config(str(cfg)), run_dir, log=lambda m: None)
    left = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert "config.toml" not in left and "run_manifest.json" not in left and "metrics.jsonl" not in left
    assert all(name in {"tokenizer.json", "data", ".lock"} for name in left), left

    monkeypatch.setattr(run_module.Trainer, "fit", real_fit)
    retry = load_run_config(str(cfg), ["train.lr=1e-3"])
    summary = train_run(retry, run_dir, log=lambda m: None)
    assert summary["steps"] == 2
    assert read_run_config(run_dir).train.lr == 1e-3


def test_a_failed_resume_keeps_the_run(tmp_path, monkeypatch):
    """A resume that fails leaves the run as it was: its config and checkpoints are the run's, not a start's."""
    corpus = write_tiny_corpus(tmp_path / "corpus.txt")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(corpus, max_steps=2, checkpoint_every=2))
    run_dir = tmp_path / "run"
    train_run(load_run_config(str(cfg)), run_dir, log=lambda m: None)

    def boom(self):
        raise RuntimeError("injected")

    monkeypatch.setattr(run_module.Trainer, "fit", boom)
    with pytest.raises(RuntimeError, match="injected"):
        train_run(None, run_dir, resume=True, log=lambda m: None)
    assert (run_dir / "config.toml").is_file() and (run_dir / "run_manifest.json").is_file()
    assert (run_dir / "metrics.jsonl").stat().st_size > 0
