"""``moekit upcycle`` end to end on a tiny dense run: the new run evaluates to the dense model's loss before
training, trains with ``train --resume --set train.max_steps=N``, and bad sources / outputs are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_lm import tiny_config_text, write_tiny_corpus  # tests/training is on sys.path (conftest)

from moekit.lab.cli import main
from moekit.lab.training.run import read_run_config, train_run
from moekit.lab.training.run_config import build_run_config, tomllib


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("up")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    text = tiny_config_text(corpus, max_steps=6, seed=3)
    dense_text = text.split("[moe]")[0] + "[data]" + text.split("[data]")[1]
    dense = tmp / "dense"
    train_run(build_run_config(tomllib.loads(dense_text)), dense, log=lambda m: None)
    return {"tmp": tmp, "dense": dense, "corpus": corpus, "moe_text": text}


def _loss(line: str) -> str:
    return line.split("validation loss")[1].strip()


def test_upcycle_eval_and_train(runs, capsys):
    out = runs["tmp"] / "up"
    assert main(["upcycle", str(runs["dense"]), "--experts", "4", "--top-k", "2", "--granularity", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "upcycled" in printed and "4 experts, top-2, granularity 2, MoE blocks [1]" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "data", "init", "run_manifest.json",
                                                      "tokenizer.json"]
    assert not [p for p in runs["tmp"].iterdir() if p.name.startswith(".tmp-")]
    cfg, src = read_run_config(out), read_run_config(runs["dense"])
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 2 and cfg.moe.d_ff == src.model.d_ff // 2
    assert cfg.moe.capacity_factor is None and cfg.moe.normalize_gates is True
    assert cfg.train.seed == 3 and cfg.train.init_from == "init/model.safetensors"
    assert cfg.data == src.data and (out / "data" / "tokens.safetensors").read_bytes() == (
        runs["dense"] / "data" / "tokens.safetensors").read_bytes()
    # Before training, the MoE model is the dense model: the same validation loss to the printed 4 decimals.
    assert main(["eval", str(out)]) == 0
    up_line = capsys.readouterr().out
    assert main(["eval", str(runs["dense"])]) == 0
    dense_line = capsys.readouterr().out
    assert up_line.startswith("checkpoint init (step 0)") and _loss(up_line) == _loss(dense_line)
    assert main(["train", "--resume", str(out), "--set", "train.max_steps=3"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["parameters_total"] > summary["parameters_active"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics[0]["tokens_per_expert"]) == 1 and metrics[0]["drop_fraction"] == 0.0
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.startswith("checkpoint step_00000003 (step 3)")


def test_upcycle_refusals(runs, capsys):
    tmp = runs["tmp"]
    moe = tmp / "moe"
    moe.mkdir()
    (moe / "config.toml").write_text(runs["moe_text"])
    cases = [
        ([str(moe)], "already an MoE model"),
        ([str(tmp / "nope")], "does not exist"),
        ([str(runs["dense"]), "--top-k", "3"], "whole copies"),
    ]
    for argv, match in cases:
        rest = ["--experts", "4", "--top-k", "2", "--granularity", "2"] if "--top-k" not in argv else [
            "--experts", "4", "--granularity", "2"]
        assert main(["upcycle", *argv, *rest, "--out", str(tmp / "x")]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
        assert not (tmp / "x").exists()
    (tmp / "exists").mkdir()
    assert main(["upcycle", str(runs["dense"]), "--experts", "2", "--top-k", "1", "--out", str(tmp / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
