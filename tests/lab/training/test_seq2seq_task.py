"""The encoder-decoder task end to end: a tiny Switch-style Seq2SeqLM pre-trained with span corruption through
``moekit train``, evaluated, sampled, resumed bit-exactly after a crash, and taken by every command of a trained run
(analyze and distill included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moekit.errors import ConfigError
from moekit.lab.cli import main
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import build_run_config, load_run_config, to_toml, tomllib
from moekit.lab.training.seq2seq_task import Seq2SeqTask
from moekit.lab.training.tasks import RUN_COMMANDS
from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _config(tmp_path: Path, corpus: Path, *, moe: bool = True, **train) -> Path:
    train = {"max_steps": 12, "batch_size": 4, "eval_every": 6, "checkpoint_every": 6, "log_every": 1,
             "lr": 3e-3, "warmup_steps": 2, **train}
    text = (
        '[model]\narch = "seq2seq"\nd_model = 32\nn_heads = 2\nd_ff = 64\nn_encoder_layers = 2\nn_decoder_layers = 2\n'
        + ("[moe]\nnum_experts = 4\ntop_k = 1\ncapacity_factor = 1.25\n" if moe else "")
        + f'[data]\ncorpus = "{corpus}"\nvocab_size = 400\nseq_len = 32\nsentinels = 20\n'
        + "[train]\n" + "".join(f"{k} = {v}\n" for k, v in train.items())
    )
    path = tmp_path / "s2s.toml"
    path.write_text(text)
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("name", ["switch-t5-tiny", "stmoe-t5-tiny", "t5-dense-tiny"])
def test_named_seq2seq_configs_round_trip(name):
    cfg = load_run_config(CONFIGS / f"{name}.toml")
    assert cfg.arch == "seq2seq"
    again = build_run_config(tomllib.loads(to_toml(cfg.resolved())))
    assert again == cfg and again.resolved() == cfg.resolved()
    if name == "stmoe-t5-tiny":
        assert cfg.model.dense_before_moe and cfg.moe.top_k == 2 and cfg.model.z_loss_coef == 1e-3


def test_train_eval_generate_and_crash_resume_bit_exact(tmp_path, tiny_corpus, monkeypatch, capsys):
    cfg_path = _config(tmp_path, tiny_corpus)
    ref = train_run(load_run_config(cfg_path), tmp_path / "ref", log=lambda m: None)
    losses = _losses(tmp_path / "ref")
    assert len(losses) == 12 and losses[12] < losses[1]  # learns on span corruption
    assert ref["arch"] == "seq2seq" and ref["parameters_active"] < ref["parameters_total"]

    real_step = Trainer._train_step

    def crash_at_9(self, inputs, targets):
        if self.step == 8:
            raise RuntimeError("crash")
        return real_step(self, inputs, targets)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_9)
    with pytest.raises(RuntimeError, match="crash"):
        train_run(load_run_config(cfg_path), tmp_path / "b", log=lambda m: None)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    train_run(load_run_config(cfg_path), tmp_path / "b", resume=True, log=lambda m: None)
    assert _losses(tmp_path / "b") == losses  # span masks and batches resume bit for bit

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ref")]) == 0
    line = capsys.readouterr().out
    assert f"span-corruption validation loss {ref['final_val_loss']:.4f}" in line
    assert main(["generate", str(tmp_path / "ref"), "--prompt", "the <extra_id_0> of", "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()  # some decoded output (sentinels are shown, not skipped)

    # Every command of a trained run takes an encoder-decoder run (the full analyze / distill tests are in
    # tests/lab/commands/test_analyze_distill.py).
    assert Seq2SeqTask.commands == frozenset(RUN_COMMANDS)
    assert main(["analyze", str(tmp_path / "ref"), "--out", str(tmp_path / "an"), "--max-tokens", "64",
                 "--permutations", "2", "--hash-draws", "2"]) == 0
    assert "encoder block 1: dropped" in capsys.readouterr().out


def test_validate_describes_the_seq2seq_model(tmp_path, tiny_corpus, capsys):
    assert main(["validate", str(_config(tmp_path, tiny_corpus))]) == 0
    out = capsys.readouterr().out
    assert "MoE T5: 4 experts, top-1; 32 input / " in out and "FLOPs per target token" in out


@pytest.mark.parametrize("data, message", [
    ("sentinels = 1", "masked spans, more than data.sentinels = 1"),
    ("sentinels = 300", "must hold the 256 bytes, the end-of-text token and data.sentinels = 300"),
    ("noise_density = 1.5", "data.noise_density"),
    ("mean_span_length = 0.5", "data.mean_span_length"),
])
def test_bad_seq2seq_data_is_refused(tmp_path, tiny_corpus, data, message):
    text = _config(tmp_path, tiny_corpus).read_text().replace("sentinels = 20\n", data + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_run_config(tomllib.loads(text))
