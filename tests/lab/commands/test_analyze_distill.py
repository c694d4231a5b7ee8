"""``moekit analyze`` and ``moekit distill`` end to end on tiny runs (seconds), decoder LMs and encoder-decoders, and
their one-line errors."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from tiny_lm import tiny_config_text, write_tiny_corpus  # tests/training is on sys.path (conftest)

from moekit.lab.cli import main
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import build_run_config, tomllib


def _train(tmp: Path, name: str, corpus: Path, dense: bool = False, copy_data_from: Path | None = None) -> Path:
    text = tiny_config_text(corpus, max_steps=8)
    if dense:
        text = text.split("[moe]")[0] + "[data]" + text.split("[data]")[1]
    cfg = build_run_config(tomllib.loads(text))
    run_dir = tmp / name
    if copy_data_from is not None:  # the same tokenizer and tokens, as a real baseline needs
        (run_dir / "data").mkdir(parents=True)
        shutil.copy(copy_data_from / "tokenizer.json", run_dir / "tokenizer.json")
        shutil.copy(copy_data_from / "data/tokens.safetensors", run_dir / "data/tokens.safetensors")
    train_run(cfg, run_dir, log=lambda m: None)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    moe = _train(tmp, "moe", corpus)
    dense = _train(tmp, "dense", corpus, dense=True, copy_data_from=moe)
    return {"moe": moe, "dense": dense, "corpus": corpus, "tmp": tmp}


def test_analyze_writes_trace_and_report(runs, capsys):
    out = runs["tmp"] / "an"
    assert main(["analyze", str(runs["moe"]), "--out", str(out), "--max-tokens", "256", "--permutations", "5"]) == 0
    printed = capsys.readouterr().out
    assert "block 1:" in printed and "report:" in printed
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["num_tokens"] == 256 and len(summary["layers"]) == 1
    lines = (out / "trace.jsonl").read_text().splitlines()
    assert len(lines) == 256 and "category" in json.loads(lines[0])
    assert (out / "trace.safetensors").stat().st_size > 0

    class Text(HTMLParser):
        chunks: list[str] = []

        def handle_data(self, data):
            self.chunks.append(data)

    p = Text()
    p.feed((out / "report.html").read_text())
    text = " ".join(p.chunks)
    assert all(f"block 1 expert {e}" in text for e in range(4))


def test_analyze_other_text(runs):
    out = runs["tmp"] / "an-text"
    assert main(["analyze", str(runs["moe"]), "--data", str(runs["corpus"]), "--out", str(out),
                 "--max-tokens", "128", "--permutations", "5"]) == 0
    assert json.loads((out / "analysis.json").read_text())["data"] == str(runs["corpus"])


def test_distill_reports_gain_and_ratio(runs, capsys):
    student = runs["tmp"] / "student"
    rc = main(["distill", str(runs["moe"]), "--init", "top", "--dense-baseline", str(runs["dense"]),
               "--set", "train.max_steps=3", "--run-dir", str(student)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "share of the teacher's gain kept" in printed and "parameters" in printed
    info = json.loads((student / "distill.json").read_text())
    assert info["steps"] == 3 and info["init"] == "top" and info["hard_weight"] == 0.75
    assert 0 < info["parameter_ratio"] < 1
    assert info["dense_baseline_val_loss"] is not None
    # The student run is an ordinary dense run: moekit eval loads it.
    assert main(["eval", str(student), "--batches", "1"]) == 0



def test_distill_from_scratch_with_a_data_offset(runs):
    from moekit.data.batches import TokenBatches
    from moekit.lab.training.run import load_trained_run
    from moekit.training import checkpoint as ckpt
    from moekit.training.metrics import read_metrics

    # --init scratch copies nothing and --hard-weight 1.0 drops the teacher term: with the teacher's seed and no
    # offset, the student is `moekit train` of the dense config (the fixture's dense run: same seed, data, steps),
    # step for step.
    plain = runs["tmp"] / "scratch-plain"
    assert main(["distill", str(runs["moe"]), "--init", "scratch", "--hard-weight", "1.0", "--set",
                 "train.max_steps=8", "--run-dir", str(plain)]) == 0
    info = json.loads((plain / "distill.json").read_text())
    assert info["init"] == "scratch" and info["copied_parameters"] == [] and info["ffn_init"] == []
    assert info["data_offset_batches"] == 0 and info["teacher_batches_replayed"] == 8
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (plain, runs["dense"])]
    assert len(losses[0]) == 8 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert info["student_val_loss"] == pytest.approx(
        json.loads((runs["dense"] / "summary.json").read_text())["final_val_loss"], abs=1e-6)

    # --data-offset 5: the student's 3 batches are positions 5, 6, 7 of the teacher's order (all the teacher's:
    # it trained 8 steps); its last checkpoint's data position is 5 + 3 batches into that order.
    offset = runs["tmp"] / "scratch-offset"
    assert main(["distill", str(runs["moe"]), "--init", "scratch", "--data-offset", "5", "--set",
                 "train.max_steps=3", "--run-dir", str(offset)]) == 0
    info = json.loads((offset / "distill.json").read_text())
    assert info["data_offset_batches"] == 5 and info["teacher_steps"] == 8
    assert info["teacher_data_seed"] == info["student_data_seed"] == 0 and info["teacher_batches_replayed"] == 3
    run = load_trained_run(offset)
    state = ckpt.load_checkpoint(ckpt.verify_checkpoint(run.checkpoint), run.model)
    order = TokenBatches(run.data.train_tokens, 4, run.config.data.seq_len, 0)
    order.skip(8)
    assert state["step"] == 3 and state["data"] == order.state_dict()
    assert info["batches_per_epoch"] == order.batches_per_epoch()


def _one_line_error(capsys, argv: list[str], needle: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


def test_bad_input_is_a_one_line_error(runs, capsys, tmp_path):
    _one_line_error(capsys, ["analyze", str(tmp_path / "nope")], "does not exist")
    _one_line_error(capsys, ["analyze", str(runs["dense"])], "dense model")
    _one_line_error(capsys, ["distill", str(runs["dense"])], "MoE teacher")
    _one_line_error(capsys, ["distill", str(runs["moe"]), "--set", "model.d_model=64"], "train.*")
    _one_line_error(capsys, ["distill", str(runs["moe"]), "--hard-weight", "1.5"], "label weight")
    _one_line_error(capsys, ["distill", str(runs["moe"]), "--data-offset", "-1"], "data offset")
    _one_line_error(capsys, ["distill", str(runs["moe"]), "--dense-baseline", str(runs["moe"])], "not a dense")
    # A flipped byte in the newest checkpoint: refused (no silent analysis of an older model) ...
    broken = tmp_path / "broken"
    shutil.copytree(runs["moe"], broken)
    newest = sorted((broken / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    _one_line_error(capsys, ["analyze", str(broken), "--out", str(tmp_path / "a")], "checksum")
    _one_line_error(capsys, ["distill", str(broken), "--run-dir", str(tmp_path / "s")], "checksum")
    # ... unless asked to fall back to the newest checkpoint that passes.
    assert main(["analyze", str(broken), "--fallback", "--out", str(tmp_path / "a"), "--max-tokens", "64",
                 "--permutations", "2"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# encoder-decoder runs (model.arch = "seq2seq")


def _s2s_text(corpus: Path, moe: bool = True) -> str:
    return (
        '[model]\narch = "seq2seq"\nd_model = 32\nn_heads = 2\nd_ff = 64\nn_encoder_layers = 2\nn_decoder_layers = 2\n'
        + ("[moe]\nnum_experts = 4\ntop_k = 1\ncapacity_factor = 1.25\n" if moe else "")
        + f'[data]\ncorpus = "{corpus}"\nvocab_size = 400\nseq_len = 32\nsentinels = 20\n'
        + "[train]\nmax_steps = 8\nbatch_size = 4\neval_every = 4\neval_batches = 2\ncheckpoint_every = 4\n"
        + 'log_every = 1\nlr = 3e-3\nwarmup_steps = 2\nprogress = "off"\n'
    )


@pytest.fixture(scope="module")
def s2s_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2s")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    moe = tmp / "moe"
    train_run(build_run_config(tomllib.loads(_s2s_text(corpus))), moe, log=lambda m: None)
    dense = tmp / "dense"
    (dense / "data").mkdir(parents=True)
    shutil.copy(moe / "tokenizer.json", dense / "tokenizer.json")
    shutil.copy(moe / "data/tokens.safetensors", dense / "data/tokens.safetensors")
    train_run(build_run_config(tomllib.loads(_s2s_text(corpus, moe=False))), dense, log=lambda m: None)
    return {"moe": moe, "dense": dense, "tmp": tmp}


def test_seq2seq_analyze_reports_both_stacks_against_null_models(s2s_runs, capsys):
    from moekit.analysis.stats import category_ids, mutual_information_bits
    from moekit.analysis.trace import trace_seq2seq
    from moekit.lab.analysis.categories import SEQ2SEQ_CATEGORIES
    from moekit.lab.analysis.pipeline import seq2seq_examples
    from moekit.lab.training.run import load_run, load_trained_run

    out = s2s_runs["tmp"] / "an"
    assert main(["analyze", str(s2s_runs["moe"]), "--out", str(out), "--max-tokens", "256", "--permutations", "5",
                 "--hash-draws", "4"]) == 0
    printed = capsys.readouterr().out
    assert "encoder block 1: dropped" in printed and "decoder block 1: dropped" in printed
    assert "encoder (mean of 1 MoE layers" in printed and "report:" in printed
    s = json.loads((out / "analysis.json").read_text())
    assert s["arch"] == "seq2seq" and s["num_examples"] == 256 // 32 == 8
    assert s["input_len"] == 32 and s["categories"][-2:] == ["sentinel", "special"]
    T = s["target_len"]
    enc, dec = s["stacks"]["encoder"], s["stacks"]["decoder"]
    assert enc["num_tokens"] == 8 * 32 and dec["num_tokens"] == 8 * T
    assert [la["name"] for la in enc["layers"]] == ["encoder block 1"]
    assert [la["name"] for la in dec["layers"]] == ["decoder block 1"]
    # Every encoder input ends with end-of-text; every decoder input starts with the start token: "special".
    special = s["categories"].index("special")
    assert enc["corpus_category_counts"][special] >= 8 and dec["corpus_category_counts"][special] >= 8
    assert enc["corpus_category_counts"][s["categories"].index("sentinel")] >= 8  # >= 1 span per example
    for stack, line in zip(("encoder", "decoder"), s["stack_summary"], strict=True):
        layer = s["stacks"][stack]["layers"][0]
        assert line["stack"] == stack and line["layers"] == [f"{stack} block 1"]
        assert line["trained_mi_bits"] == layer["category_mi_bits"]
        assert line["untrained_mi_bits"] == layer["untrained"]["category_mi_bits"]
        assert line["hash_mi_bits"] == layer["hash"]["mutual_information_bits"]
        assert line["shuffled_mi_bits"] == layer["category_mi_chance_bits"]
        assert layer["hash"]["draws"] == 4 and 0 <= layer["hash"]["max_load_deviation"] < 0.5
        assert 0 < line["trained_mi_bits"] <= line["category_entropy_bits"]

    # Null model (a) recomputed independently: the run's config initialised with its seed (load_run builds that
    # model), traced on the same examples, against the categories written in the trace files.
    run = load_trained_run(s2s_runs["moe"])
    _, _, fresh = load_run(s2s_runs["moe"])
    traces = trace_seq2seq(fresh.eval(), seq2seq_examples(run, run.data.val_tokens, 256))
    for stack in ("encoder", "decoder"):
        rows = [json.loads(x) for x in (out / f"{stack}_trace.jsonl").read_text().splitlines()]
        assert len(rows) == s["stacks"][stack]["num_tokens"]
        assert [r["token_id"] for r in rows] == traces[stack].token_ids_N.tolist()
        cat_N = category_ids([r["category"] for r in rows], SEQ2SEQ_CATEGORIES)
        mi = mutual_information_bits(traces[stack].expert_ids_LNK[0][:, 0], cat_N)
        assert s["stacks"][stack]["layers"][0]["untrained"]["category_mi_bits"] == pytest.approx(mi, abs=1e-12)
        # ... and the trained MI from the trained trace file.
        trained = np.array([r["layers"][0]["experts"][0] for r in rows])
        assert s["stacks"][stack]["layers"][0]["category_mi_bits"] == pytest.approx(
            mutual_information_bits(trained, cat_N), abs=1e-12)

    html_text = (out / "report.html").read_text()
    for needle in ("encoder block 1 expert 0", "decoder block 1 expert 3", "Specialisation against null models",
                   "load-matched hash", 'id="decoder-block1-expert2"'):
        assert needle in html_text, needle


def test_seq2seq_distill_end_to_end(s2s_runs, capsys):
    from moekit.lab.training.run import load_trained_run
    from moekit.models.seq2seq_flops import seq2seq_flops_per_token

    student = s2s_runs["tmp"] / "student"
    rc = main(["distill", str(s2s_runs["moe"]), "--dense-baseline", str(s2s_runs["dense"]),
               "--set", "train.max_steps=3", "--run-dir", str(student)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "nats/target token" in printed and "share of the teacher's gain kept" in printed
    info = json.loads((student / "distill.json").read_text())
    assert info["arch"] == "seq2seq" and info["steps"] == 3 and info["init"] == "mean"
    assert info["teacher_data_seed"] == 0 and info["student_data_seed"] == 1  # fresh batches
    assert [(r["stack"], r["block"]) for r in info["ffn_init"]] == [("encoder", 1), ("decoder", 1)]
    assert info["dense_baseline_val_loss"] is not None
    gain = info["dense_baseline_val_loss"] - info["teacher_val_loss"]
    expected = None if gain <= 0 else (info["dense_baseline_val_loss"] - info["student_val_loss"]) / gain
    assert info["gain_kept"] == (pytest.approx(expected) if expected is not None else None)
    assert 0 < info["parameter_ratio"] < 1
    # The student is dense, and its FLOPs per target token are the teacher's active FLOPs but for the routers'
    # 2 E D per token and MoE layer (S = 32 inputs through the encoder's, T targets through the decoder's).
    s_run, t_run = load_trained_run(student), load_trained_run(s2s_runs["moe"])
    assert not s_run.model.moe_layers and s_run.config.moe is None
    assert s_run.config.train.seed == 1
    S, T = 32, t_run.config.task.units_per_row(t_run.config)
    s_f = seq2seq_flops_per_token(s_run.model.config, S, T)
    t_f = seq2seq_flops_per_token(t_run.model.config, S, T)
    assert t_f["forward_per_example"] - s_f["forward_per_example"] == 2 * 4 * 32 * (S + T)
    assert info["student_forward_flops_per_target_token"] == s_f["forward"]
    assert info["teacher_forward_flops_per_target_token"] == t_f["forward"]
    # Its first training batch is not the teacher's.
    t_batch = t_run.config.task.batches(t_run.config, t_run.data).next_batch()
    s_batch = s_run.config.task.batches(s_run.config, s_run.data).next_batch()
    assert not np.array_equal(t_batch.inputs.numpy(), s_batch.inputs.numpy())
    # An ordinary dense seq2seq run: moekit eval loads it.
    assert main(["eval", str(student), "--batches", "1"]) == 0
    assert "span-corruption validation loss" in capsys.readouterr().out


def test_seq2seq_distill_refuses_a_language_model_baseline(s2s_runs, runs, capsys):
    err = _one_line_error(capsys, ["distill", str(s2s_runs["moe"]), "--dense-baseline", str(runs["dense"]),
                                   "--run-dir", str(s2s_runs["tmp"] / "x")], "not an encoder-decoder run")
    assert err.startswith("moekit distill: error:")
    assert not (s2s_runs["tmp"] / "x").exists()  # refused before the student's run directory is written


def test_seq2seq_distill_from_scratch_with_a_data_offset(s2s_runs):
    student = s2s_runs["tmp"] / "scratch"
    assert main(["distill", str(s2s_runs["moe"]), "--init", "scratch", "--data-offset", "2", "--set",
                 "train.max_steps=2", "--run-dir", str(student)]) == 0
    info = json.loads((student / "distill.json").read_text())
    assert info["init"] == "scratch" and info["copied_parameters"] == [] and info["ffn_init"] == []
    assert info["data_offset_batches"] == 2 and info["teacher_steps"] == 8
    # The student's seed is the teacher's + 1: another order, so no batch of the teacher's recurs whole.
    assert info["student_data_seed"] == 1 and info["teacher_batches_replayed"] is None
