"""A run that starts from given weights (``start_run_from_weights``, ``train.init_from``): its files, the commands
that load it before any checkpoint exists (step 0), and ``train --resume`` training from those weights with
``--set`` overrides."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_config_text, write_tiny_corpus  # tests/training is on sys.path (conftest)

from moekit.errors import MoekitError
from moekit.lab.cli import main
from moekit.lab.training.run import load_trained_run, read_run_config, start_run_from_weights, train_run
from moekit.lab.training.run_config import build_run_config, tomllib
from moekit.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny trained dense run (6 steps)."""
    tmp = tmp_path_factory.mktemp("src")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    text = tiny_config_text(corpus, max_steps=6)
    text = text.split("[moe]")[0] + "[data]" + text.split("[data]")[1]  # dense
    run_dir = tmp / "dense"
    train_run(build_run_config(tomllib.loads(text)), run_dir, log=lambda m: None)
    return run_dir


def _new_run(source: Path, dest: Path, **train) -> Path:
    """A run from ``source``'s trained weights: data files copied, then start_run_from_weights."""
    loaded = load_trained_run(source)
    (dest / "data").mkdir(parents=True)
    for name in ("tokenizer.json", "data/tokens.safetensors"):
        shutil.copyfile(source / name, dest / name)
    cfg = dataclasses.replace(loaded.config, train=dataclasses.replace(loaded.config.train, **train))
    start_run_from_weights(cfg, dest, loaded.model)
    return dest


def test_files_and_loading_at_step_0(source, tmp_path):
    run_dir = _new_run(source, tmp_path / "new", max_steps=4)
    cfg = read_run_config(run_dir)
    assert cfg.train.init_from == "init/model.safetensors" and cfg.train.max_steps == 4
    assert (run_dir / "init" / "manifest.json").is_file() and not (run_dir / "checkpoints").exists()
    run = load_trained_run(run_dir)
    assert run.step == 0 and run.checkpoint == run_dir / "init"
    trained = load_trained_run(source)
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(),
                                                 trained.model.state_dict().values(), strict=True))


def test_refuses_an_existing_run_and_a_foreign_model(source, tmp_path):
    run_dir = _new_run(source, tmp_path / "new")
    loaded = load_trained_run(source)
    with pytest.raises(MoekitError, match="already holds a run"):
        start_run_from_weights(loaded.config, run_dir, loaded.model)
    with pytest.raises(MoekitError, match="already holds a run"):
        start_run_from_weights(loaded.config, source, loaded.model)
    wider = dataclasses.replace(loaded.config, model=dataclasses.replace(loaded.config.model, d_ff=128))
    with pytest.raises(MoekitError, match="differs from the run config"):
        start_run_from_weights(wider, tmp_path / "other", loaded.model)
    assert not (tmp_path / "other").exists()


def test_eval_and_resume_train_from_the_weights(source, tmp_path, capsys):
    run_dir = _new_run(source, tmp_path / "new", max_steps=3, eval_every=3)
    assert main(["eval", str(run_dir)]) == 0
    line = capsys.readouterr().out
    assert main(["eval", str(source)]) == 0
    src_line = capsys.readouterr().out
    # Same weights, same validation tokens: the same loss to every printed digit.
    assert line.split("validation loss")[1] == src_line.split("validation loss")[1]
    assert line.startswith("checkpoint init (step 0)")
    assert main(["train", "--resume", str(run_dir), "--set", "train.max_steps=4"]) == 0
    capsys.readouterr()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # It started from the trained dense weights: the first loss is the trained model's, far below ln(V).
    src_metrics = [json.loads(x) for x in (source / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and metrics[0]["loss"] < src_metrics[0]["loss"] - 0.3
    assert read_run_config(run_dir).train.init_from == "init/model.safetensors"
    # its first training session recorded the run's config and data: eval and resume verify them from now on
    recorded = json.loads((run_dir / "run_manifest.json").read_text())["sha256"]
    assert set(recorded) == {"config.toml", "tokenizer.json", "data/tokens.safetensors"}


def test_resume_with_a_fresh_train_section_keeps_init_from(source, tmp_path):
    run_dir = _new_run(source, tmp_path / "new", max_steps=2)
    cfg = read_run_config(run_dir)
    fresh = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=None, max_steps=2))
    train_run(fresh, run_dir, resume=True, log=lambda m: None)
    step0 = ckpt.list_checkpoints(run_dir / "checkpoints")[-1]
    init = load_trained_run(source).model
    model = load_trained_run(run_dir).model
    ckpt.load_checkpoint(ckpt.verify_checkpoint(step0), model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values(),
                                                 strict=True))


def test_an_encoder_decoder_run_starts_from_its_weights(tmp_path, capsys):
    """The run config of an encoder-decoder also fixes its end-of-sequence id (from the tokenizer): a Seq2SeqLM's
    trained weights start a new run, which evaluates to the same loss as the source at step 0 and trains on."""
    corpus = write_tiny_corpus(tmp_path / "corpus.txt")
    text = (
        '[model]\narch = "seq2seq"\nd_model = 32\nn_heads = 2\nd_ff = 64\nn_encoder_layers = 2\n'
        'n_decoder_layers = 2\n[moe]\nnum_experts = 4\ntop_k = 1\n'
        f'[data]\ncorpus = "{corpus}"\nvocab_size = 400\nseq_len = 32\nsentinels = 20\n'
        "[train]\nmax_steps = 4\nbatch_size = 4\neval_every = 4\ncheckpoint_every = 4\n"
    )
    source = tmp_path / "s2s"
    train_run(build_run_config(tomllib.loads(text)), source, log=lambda m: None)
    run_dir = _new_run(source, tmp_path / "new", max_steps=2, eval_every=2, seed=1)
    run = load_trained_run(run_dir)
    assert run.step == 0 and run.model.config.eos_token_id == load_trained_run(source).model.config.eos_token_id
    assert main(["eval", str(run_dir)]) == 0
    line = capsys.readouterr().out
    assert main(["eval", str(source)]) == 0
    assert line.split("validation loss")[1] == capsys.readouterr().out.split("validation loss")[1]
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert load_trained_run(run_dir).step == 2
