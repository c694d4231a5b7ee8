"""Fixtures shared by the run-directory tests of this folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_lm import tiny_config_text  # tests/training is on sys.path (tests/conftest.py)

from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config


@pytest.fixture
def trained(tmp_path: Path, tiny_corpus: Path) -> tuple[Path, Path]:
    """A finished 8-step run (checkpoints at 4 and 8) and its config file."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(tiny_corpus, max_steps=8))
    run_dir = tmp_path / "run"
    train_run(load_run_config(cfg), run_dir, log=lambda m: None)
    return run_dir, cfg
