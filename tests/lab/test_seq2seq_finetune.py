"""``moekit finetune-seq2seq``: a tiny Switch-style encoder-decoder run (pre-trained two steps) fine-tuned on tiny
in-memory tasks whose answer is a function of the input. Nothing is downloaded: the task loader is replaced."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_lm import tiny_config_text, write_tiny_corpus

from moekit.errors import ConfigError
from moekit.experts.bank import ExpertBank
from moekit.lab import seq2seq_finetune as sf
from moekit.lab.adapters.tasks import Example
from moekit.lab.cli import main
from moekit.lab.data.tokenizer import load_tokenizer
from moekit.lab.seq2seq_finetune import Seq2SeqFinetuneConfig, finetune_seq2seq, set_dropout
from moekit.lab.training.run import load_trained_run, train_run
from moekit.lab.training.run_config import load_run_config
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.models.seq2seq import FeedForwardSublayer, T5Attention, T5Block, T5Stack


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny Switch-style seq2seq run (2 + 2 blocks, 4 experts top-1 in block 1 of each stack), trained 2 steps."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("s2s")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    (tmp / "c.toml").write_text(
        '[model]\narch = "seq2seq"\nd_model = 32\nn_heads = 2\nd_ff = 64\nn_encoder_layers = 2\n'
        "[moe]\nnum_experts = 4\ntop_k = 1\ncapacity_factor = 1.25\n"
        f'[data]\ncorpus = "{corpus}"\nvocab_size = 400\nseq_len = 32\nsentinels = 20\n'
        '[train]\nmax_steps = 2\nbatch_size = 4\neval_every = 0\neval_batches = 1\ncheckpoint_every = 0\n'
        'progress = "off"\n'
    )
    torch.manual_seed(0)
    train_run(load_run_config(tmp / "c.toml"), tmp / "run", log=lambda m: None)
    return tmp / "run"


def _toy(n: int, seed: int) -> list[Example]:
    """"Is it a? a" -> yes, "Is it a? b" -> no."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.choice("ab")
        out.append(Example(f"Is it a? {x}", ["yes", "no"], 0 if x == "a" else 1))
    return out


TRAIN = {"sentiment": _toy(64, 0), "spam": [Example(f"Spam? {w}", ["spam", "not spam"], int(w == "hi"))
                                            for w in ["buy", "hi"] * 16]}
TEST = {"sentiment": _toy(8, 1), "spam": [Example(f"Spam? {w}", ["spam", "not spam"], int(w == "hi"))
                                          for w in ["buy", "hi", "hi"]]}


def _cfg(**kw) -> Seq2SeqFinetuneConfig:
    return Seq2SeqFinetuneConfig(**{"tasks": ["sentiment"], "steps": 30, "batch_size": 8, "lr": 3e-3, **kw})


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    return {k.removeprefix("lm."): v for k, v in load_file(str(last / "model.safetensors")).items()}


def test_toy_task_is_learned_and_outputs_complete(run_dir, tmp_path):
    out = tmp_path / "ft"
    s = finetune_seq2seq(run_dir, out, _cfg(eval_every=15), examples=(TRAIN, TEST), log=lambda m: None,
                         progress="off")
    # 34 of the 64 training answers are "no" (the majority class) and 5 of the 8 test answers.
    assert sum(e.label == 1 for e in TRAIN["sentiment"]) == 34 and sum(e.label == 1 for e in TEST["sentiment"]) == 5
    assert s["per_task"]["sentiment"]["majority_answer"] == "no"
    assert s["majority"] == pytest.approx(5 / 8)
    assert s["exact_match"] == 1.0 and s["rank"] == 1.0
    assert [e["step"] for e in s["evaluations"]] == [15, 30]
    assert s["evaluations"][1]["val_loss"] < s["evaluations"][0]["val_loss"] < 4.0
    assert s["final_val_loss"] == s["evaluations"][1]["val_loss"]
    assert s["parameters"]["trainable"] == s["parameters"]["total"] > s["parameters"]["moe"] > 0

    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.json", "metrics.jsonl", "predictions.jsonl", "summary.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["tasks"] == ["sentiment"] and config["lr"] == 3e-3 and config["update"] == "all"
    assert config["checkpoint_step"] == 2 and config["resolved_dropout"]["dropout"] == 0.0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]  # log_every 3
    assert [m["val_accuracy"] for m in metrics if "val_loss" in m] == [e["rank"] for e in s["evaluations"]]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(p["task"], p["index"]) for p in preds] == [("sentiment", i) for i in range(8)]
    for p, ex in zip(preds, TEST["sentiment"], strict=True):
        assert p["gold"] == ex.candidates[ex.label] and p["gold_index"] == ex.label
        assert p["candidates"] == ["yes", "no"] and len(p["log_likelihoods"]) == 2
        assert p["rank_index"] == max(range(2), key=lambda i: p["log_likelihoods"][i]) == ex.label
        assert p["exact_match_prediction"] == p["gold"] and p["exact_match_correct"] and p["rank_correct"]


@pytest.mark.parametrize("update", ["non-moe", "moe"])
def test_update_freezes_the_other_parameters(run_dir, tmp_path, update):
    before = load_trained_run(run_dir).model.state_dict()
    s = finetune_seq2seq(run_dir, tmp_path / "ft", _cfg(steps=3, update=update), examples=(TRAIN, TEST),
                         log=lambda m: None, progress="off")
    after = _final_weights(tmp_path / "ft")
    assert after.keys() == before.keys()
    moe_names = {k for k in before if ".ffn.router." in k or ".ffn.experts." in k}
    assert len(moe_names) == 8  # router + 3 expert tensors, one MoE layer per stack
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if update == "non-moe":
        assert not changed & moe_names  # every router and expert tensor bit-identical
        assert changed == set(before) - moe_names  # every other parameter moved
        assert s["parameters"]["trainable"] == s["parameters"]["total"] - s["parameters"]["moe"]
    else:
        assert changed == moe_names
        assert s["parameters"]["trainable"] == s["parameters"]["moe"] == sum(before[k].numel() for k in moe_names)


@torch.no_grad()
def test_rank_classification_and_greedy_by_hand(run_dir, tmp_path):
    # A tie (two identical candidates) goes to the first of them.
    test = {"sentiment": [*TEST["sentiment"][:3], Example("Is it a? a", ["no", "no"], 1)]}
    finetune_seq2seq(run_dir, tmp_path / "ft", _cfg(steps=0), examples=(TRAIN, test), log=lambda m: None)
    preds = [json.loads(line) for line in (tmp_path / "ft" / "predictions.jsonl").read_text().splitlines()]
    loaded = load_trained_run(run_dir)
    model, tok = loaded.model, load_tokenizer(loaded.data.tokenizer_path)
    eos = model.config.eos_token_id
    for p, ex in zip(preds, test["sentiment"], strict=True):
        ids = torch.tensor([tok.encode(ex.text, add_special_tokens=False).ids + [eos]])
        lls = []
        for cand in ex.candidates:
            labels = torch.tensor([tok.encode(cand, add_special_tokens=False).ids + [eos]])
            logp = F.log_softmax(model(ids, labels).logits_BTV.float(), -1)[0]
            lls.append(sum(float(logp[t, labels[0, t]]) for t in range(labels.shape[1])))
        assert p["log_likelihoods"] == pytest.approx(lls, abs=1e-5)
        assert p["rank_index"] == lls.index(max(lls))
        # Greedy decoding without a cache: the argmax continuation, one full forward per token.
        dec = [model.config.decoder_start_token_id]
        for _ in range(max(len(tok.encode(c).ids) for c in ex.candidates) + 1):
            nxt = int(model(ids, decoder_input_ids_BT=torch.tensor([dec])).logits_BTV[0, -1].argmax())
            if nxt == eos:
                break
            dec.append(nxt)
        assert p["exact_match_prediction"] == tok.decode(dec[1:], skip_special_tokens=False)
    assert preds[-1]["log_likelihoods"][0] == preds[-1]["log_likelihoods"][1]
    assert preds[-1]["rank_index"] == 0 and not preds[-1]["rank_correct"]


def test_expert_dropout_reaches_expert_banks(run_dir, tmp_path):
    model = load_trained_run(run_dir).model
    reached = set_dropout(model, 0.1, 0.4)
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    assert len(banks) == 2 and all(b.dropout == 0.4 for b in banks)
    others = [m for m in model.modules() if isinstance(m, (T5Stack, T5Block, T5Attention, FeedForwardSublayer))]
    dense = [m for m in model.modules() if isinstance(m, DenseFFN)]
    # 2 stacks, 4 blocks, 6 attentions (2 encoder self, 2 decoder self, 2 cross), 4 FFN sublayers, 2 dense FFNs
    assert (len(others), len(dense)) == (16, 2) and all(m.dropout == 0.1 for m in others + dense)
    assert reached == {"dropout": 18, "expert_dropout": 2}
    # The rate acts: in training mode the MoE layers' outputs change with the expert dropout draw, not without it.
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    moe.train()
    x = torch.randn(6, 32)
    a, b = moe(x)[0], moe(x)[0]
    assert not torch.equal(a, b)
    set_dropout(model, None, 0.0)
    assert torch.equal(moe(x)[0], moe(x)[0]) and all(b.dropout == 0.0 for b in banks)
    # Through the command's options: recorded in config.json.
    finetune_seq2seq(run_dir, tmp_path / "ft", _cfg(steps=1, dropout=0.1, expert_dropout=0.4),
                     examples=(TRAIN, TEST), log=lambda m: None, progress="off")
    resolved = json.loads((tmp_path / "ft" / "config.json").read_text())["resolved_dropout"]
    assert resolved == {"dropout": 0.1, "expert_dropout": 0.4, "modules_reached": reached}


def test_command_multitask_and_deterministic(run_dir, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_build_tasks(n_train, n_test, seed, seen, heldout):
        calls.append((n_train, n_test, seed, seen, heldout))
        return ({t: TRAIN[t][:n_train] for t in seen}, {t: TEST[t][:n_test] for t in seen})

    monkeypatch.setattr(sf, "build_tasks", fake_build_tasks)
    args = ["finetune-seq2seq", str(run_dir), "--task", "sentiment,spam", "--steps", "6", "--batch-size", "4",
            "--lr", "3e-3", "--n-test", "5", "--seed", "3", "--dropout", "0.1", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert calls == [(1000, 5, 3, ("sentiment", "spam"), ())]
    assert "sentiment: exact match" in out and "spam: exact match" in out and "mean over tasks" in out
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    for name in ("predictions.jsonl", "config.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 6  # every step logged (6 steps)
    preds = [json.loads(line) for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert [p["task"] for p in preds] == ["sentiment"] * 5 + ["spam"] * 3


def test_refusals_are_one_line(run_dir, tmp_path, capsys, tiny_corpus):
    lm_run = tmp_path / "lm"
    lm_run.mkdir()
    (lm_run / "config.toml").write_text(tiny_config_text(tiny_corpus))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    base = ["finetune-seq2seq", str(run_dir), "--task", "sentiment", "--out", str(tmp_path / "o")]
    cases = [
        (["finetune-seq2seq", str(run_dir), "--task", "sentiment", "--out", str(busy)], "is not empty"),
        (["finetune-seq2seq", str(lm_run), "--task", "sentiment", "--out", str(tmp_path / "o")],
         "works on encoder-decoder runs"),
        (["finetune-seq2seq", str(tmp_path / "nope"), "--task", "sentiment", "--out", str(tmp_path / "o")],
         "does not exist"),
        ([*base[:3], "sentiment,nosuch", *base[4:]], "unknown task 'nosuch'"),
        ([*base[:3], "sentiment,", *base[4:]], "--task must be task names"),
        ([*base, "--update", "experts"], "--update must be one of"),
        ([*base, "--lr", "-1"], "--lr must be"),
        ([*base, "--expert-dropout", "1.5"], "--expert-dropout must be in [0, 1)"),
        ([*base, "--batch-size", "0"], "--batch-size must be a positive integer"),
        ([*base, "--steps", "-1"], "--steps must be an integer >= 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("moekit finetune-seq2seq: error: ") and message in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="names a task twice"):
        Seq2SeqFinetuneConfig(tasks=["spam", "spam"])
