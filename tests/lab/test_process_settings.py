"""Process-wide settings belong to the command line: ``moekit train`` applies ``train.threads`` (also on a resume)
and tunes malloc unless ``--no-tune-malloc``; the library functions it calls (``train_run``, ``plot_run``) change
neither the thread count nor matplotlib's backend."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_lm import tiny_config_text

from moekit.lab import cli
from moekit.lab.training.plots import plot_run
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config


@pytest.fixture
def malloc_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1) or True)
    return calls


def test_train_run_leaves_the_thread_count_and_the_cli_applies_train_threads(tmp_path, tiny_corpus, malloc_calls):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(tiny_corpus, max_steps=2, eval_every=2, checkpoint_every=2, threads=3))
    assert torch.get_num_threads() == 1  # conftest
    train_run(load_run_config(str(cfg)), tmp_path / "library")
    assert torch.get_num_threads() == 1, "train_run changed the process's thread count"

    assert cli.main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "cli"), "--no-tune-malloc"]) == 0
    assert torch.get_num_threads() == 3 and malloc_calls == []
    # A resume takes the saved train.threads, or the override.
    torch.set_num_threads(1)
    assert cli.main(["train", "--resume", str(tmp_path / "cli"), "--set", "train.max_steps=3"]) == 0
    assert torch.get_num_threads() == 3 and malloc_calls == [1]
    assert cli.main(["train", "--resume", str(tmp_path / "cli"), "--set", "train.max_steps=4",
                     "--set", "train.threads=2"]) == 0
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("argv", [["train"], ["compare", "a.toml"], ["finetune"], ["bench"]])
def test_commands_that_train_offer_no_tune_malloc(argv):
    parser = cli.build_parser()
    assert parser.parse_args(argv).tune_malloc is True
    assert parser.parse_args([*argv, "--no-tune-malloc"]).tune_malloc is False


def test_plot_run_selects_no_backend(tmp_path, tiny_corpus):
    import matplotlib

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(tiny_corpus, max_steps=2, eval_every=2, checkpoint_every=2))
    train_run(load_run_config(str(cfg)), tmp_path / "run")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # without resolving the automatic choice
    written = plot_run(tmp_path / "run")
    assert {p.name for p in written} == {"loss.png", "expert_load.png", "load_balance.png"}
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules
