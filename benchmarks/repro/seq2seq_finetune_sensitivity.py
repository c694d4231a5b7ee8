"""Fine-tuning sensitivity to batch size and learning rate, sparse vs dense encoder-decoder, at small scale (ST-MoE,
Zoph et al. 2022, section 4: sparse models prefer smaller batches and higher learning rates when fine-tuning, dense
models the opposite).

The models are the pre-trained encoder-decoders of ``benchmarks/repro/seq2seq_pretraining.py`` (read only):
``switch`` (configs/switch-t5-tiny.toml: top-1 of 8 experts in every other FFN) and its FLOP-matched dense T5
``t5_dense`` (t5-dense-tiny), 300 steps of span corruption per seed. Per seed, a 2 x 2 x 2 grid of fine-tuning runs
through ``moekit.lab.seq2seq_finetune.finetune_seq2seq`` (what ``moekit finetune-seq2seq`` runs; the job runner,
the task examples and the interval and verdict rules are ``seq2seq_finetuning.py``'s):

- model in {switch, t5_dense} x batch size in {8, 32} x learning rate in {1e-4, 1e-3};
- every run on task ``sentiment``, every parameter updated, dropout 0.1 (and expert dropout 0.1 for the sparse
  model; the dense model has no experts), AdamW at a constant learning rate without warm-up, the command's defaults
  otherwise (the ``all`` arm of the (a)/(c) study), the same number of steps for every run (``--steps``; a batch of
  32 therefore sees 4 times the examples of a batch of 8, as fine-tuning at a fixed step count does);
- seeds paired: the pre-training seed is the fine-tuning seed, so the runs of a seed start from the same weights
  (per model), draw the training examples in the same order and are scored on the same test examples.

Figures per run: the test cross-entropy of the gold answer (primary: continuous, where the accuracies of these
small models are often those of a constant predictor), rank-classification accuracy, exact match, and the
majority-class baseline. Contrasts, paired by seed, with 95 % t intervals over seeds (M a figure; "benefit" of a
setting = M at that setting minus M at the other, averaged over the other factor's two levels):

- small-batch benefit per model: M(bs 8) - M(bs 32);
- high-learning-rate benefit per model: M(lr 1e-3) - M(lr 1e-4);
- the interactions that carry the claim: sparse minus dense small-batch benefit, sparse minus dense high-learning-
  rate benefit.

The paper's side: for the loss negative (lower is better), for accuracy positive, for the sparse model's benefits and
the interactions; the dense model's benefits have the opposite side (it prefers larger batches and lower learning
rates). Verdict: "reproduced" when the interval excludes zero on the paper's side, "contradicted" when it excludes
zero on the other side, otherwise "not resolved at this scale" (also, for an accuracy, when every run in the
contrast answers one label for every test example: such accuracies measure a label prior, not fine-tuning). The
per-model best cell (lowest mean gold-answer loss) is reported descriptively.

Usage (one torch thread per run, ``--workers`` runs at a time)::

    python benchmarks/repro/seq2seq_finetune_sensitivity.py --out docs/results/seq2seq_finetune_sensitivity \\
        --runs /tmp/s2s-sensitivity-runs --pretrained /tmp/s2s-pretraining-runs

Smoke test (a minute): ``--steps 2 --n-train 40 --n-test 10 --seeds 1 --out /tmp/x --runs /tmp/y``. Finished runs
(``summary.json``) are skipped on a rerun; ``runs.csv``, ``results.json`` and ``results.md`` are rewritten into
``--out`` after every finished run. Then

    python benchmarks/repro/seq2seq_finetune_sensitivity.py --out docs/results/seq2seq_finetune_sensitivity \\
        --section docs/RESULTS.md --notes docs/results/seq2seq_finetune_sensitivity/notes.md

writes (or replaces) the section "Fine-tuning sensitivity: batch size and learning rate, sparse vs dense (ST-MoE)"
of docs/RESULTS.md from ``results.json`` (``--notes``: a hand-written markdown file appended to the section).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import math
import multiprocessing
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import replace_section  # noqa: E402
from seq2seq_finetuning import answer_shares, interval, log, run_one, verdict  # noqa: E402

from moekit.atomic import atomic_write_text  # noqa: E402

TASK = "sentiment"
MODELS = ("switch", "t5_dense")
SPARSE, DENSE = MODELS
MODEL_NAMES = {"switch": "switch-t5-tiny (sparse)", "t5_dense": "t5-dense-tiny (dense)"}
DROPOUT, EXPERT_DROPOUT = 0.1, 0.1
FIGURES = ("gold_loss", "rank", "exact_match")
FIGURE_NAMES = {"gold_loss": "gold-answer loss", "rank": "rank accuracy", "exact_match": "exact match"}
SECTION = "## Fine-tuning sensitivity: batch size and learning rate, sparse vs dense (ST-MoE)"
TITLE = "# Fine-tuning sensitivity: batch size and learning rate, sparse vs dense encoder-decoder"


def cell_name(bs: int, lr: float) -> str:
    return f"bs{bs}_lr{lr:g}"


def _num(x: Any) -> float:
    """A figure as a float (None, or a string such as "nan" from a summary's non-finite value, -> nan)."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def fmt(x: Any, spec: str) -> str:
    x = _num(x)
    return "nan" if math.isnan(x) else format(x, spec)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None at any depth (standard JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- runs -----------------------------------------------------------------------------------------------------------

def make_jobs(args: argparse.Namespace, seeds: list[int]) -> list[dict]:
    """Seed by seed (a seed's contrasts are complete after its 8 runs), then model, batch size, learning rate."""
    jobs = []
    for seed in seeds:
        for model in MODELS:
            run_dir = Path(args.pretrained) / f"seed{seed}" / model
            if not (run_dir / "summary.json").is_file():
                raise SystemExit(f"{run_dir} is not a finished pre-training run")
            for bs in args.batch_sizes:
                for lr in args.lrs:
                    jobs.append({
                        "task": TASK, "seed": seed, "arm": f"{model}/{cell_name(bs, lr)}", "run_dir": str(run_dir),
                        "out_dir": str(Path(args.runs) / f"seed{seed}" / model / cell_name(bs, lr)),
                        "update": "all", "dropout": DROPOUT,
                        "expert_dropout": EXPERT_DROPOUT if model == SPARSE else None,
                        "steps": args.steps, "batch_size": bs, "lr": lr, "n_train": args.n_train,
                        "n_test": args.n_test, "max_input_tokens": args.max_input_tokens,
                        "model": model,
                    })
    return jobs


def final_train_ce(out_dir: Path) -> float:
    """The training cross-entropy at the last logged step (of its batch; dropout on)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return math.nan
    last = math.nan
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "ce_loss" in rec:
                last = _num(rec["ce_loss"])
    return last


def collect(runs: Path, seeds: list[int], batch_sizes: list[int], lrs: list[float]) -> list[dict]:
    rows = []
    for seed in seeds:
        for model in MODELS:
            for bs in batch_sizes:
                for lr in lrs:
                    d = runs / f"seed{seed}" / model / cell_name(bs, lr)
                    if not (d / "summary.json").is_file():
                        continue
                    s = json.loads((d / "summary.json").read_text())
                    cfg = json.loads((d / "config.json").read_text())
                    rows.append({
                        "seed": seed, "model": model, "batch_size": bs, "lr": lr,
                        "steps": s["steps"], "examples_seen": s["steps"] * bs,
                        "dropout": s["dropout"]["dropout"], "expert_dropout": s["dropout"]["expert_dropout"],
                        "gold_loss": _num(s["final_val_loss"]), "rank": _num(s["rank"]),
                        "exact_match": _num(s["exact_match"]), "majority": _num(s["majority"]),
                        "majority_answer": s["per_task"][TASK].get("majority_answer", ""),
                        "n_test": s["per_task"][TASK].get("n_test", ""), "n_train": s["n_train"][TASK],
                        "final_train_ce": final_train_ce(d), "skipped_steps": s["skipped_steps"],
                        "trainable": s["parameters"]["trainable"], "total": s["parameters"]["total"],
                        "checkpoint_step": s["checkpoint_step"], "max_input_tokens": cfg["max_input_tokens"],
                        "train_time_s": _num(s["train_time_s"]), "wall_seconds": _num(s["wall_seconds"]),
                        "out_dir": str(d), **answer_shares(d),
                    })
    return rows


# -- contrasts ------------------------------------------------------------------------------------------------------

def contrast_specs(batch_sizes: list[int], lrs: list[float]) -> list[dict]:
    """Each contrast: name, what it is, the paper's side for the loss (accuracy: the opposite), and per seed how it
    is computed from the cell values ``v[(model, bs, lr)]``."""
    small, large = sorted(batch_sizes)
    low, high = sorted(lrs)

    def batch_benefit(model: str) -> Any:
        return lambda v: statistics.fmean(v[(model, small, lr)] - v[(model, large, lr)] for lr in (low, high))

    def lr_benefit(model: str) -> Any:
        return lambda v: statistics.fmean(v[(model, bs, high)] - v[(model, bs, low)] for bs in (small, large))

    specs = []
    for model, side in ((SPARSE, "neg"), (DENSE, "pos")):
        specs.append({"name": f"{model}: bs {small} - bs {large}", "kind": "small-batch benefit", "model": model,
                      "loss_side": side, "fn": batch_benefit(model),
                      "what": f"{MODEL_NAMES[model]}: M(batch {small}) - M(batch {large}), mean over the two "
                              "learning rates"})
    for model, side in ((SPARSE, "neg"), (DENSE, "pos")):
        specs.append({"name": f"{model}: lr {high:g} - lr {low:g}", "kind": "high-learning-rate benefit",
                      "model": model, "loss_side": side, "fn": lr_benefit(model),
                      "what": f"{MODEL_NAMES[model]}: M(lr {high:g}) - M(lr {low:g}), mean over the two batch "
                              "sizes"})
    sb, db = batch_benefit(SPARSE), batch_benefit(DENSE)
    sl, dl = lr_benefit(SPARSE), lr_benefit(DENSE)
    specs.append({"name": "interaction: small-batch benefit, sparse - dense", "kind": "interaction", "model": None,
                  "loss_side": "neg", "fn": lambda v: sb(v) - db(v),
                  "what": "[sparse small-batch benefit] - [dense small-batch benefit]"})
    specs.append({"name": "interaction: high-lr benefit, sparse - dense", "kind": "interaction", "model": None,
                  "loss_side": "neg", "fn": lambda v: sl(v) - dl(v),
                  "what": "[sparse high-learning-rate benefit] - [dense high-learning-rate benefit]"})
    return specs


def side_for(figure: str, loss_side: str) -> str:
    if figure == "gold_loss":
        return loss_side
    return "pos" if loss_side == "neg" else "neg"


def summarise(rows: list[dict], args: dict, command: str) -> dict:
    bss, lrs = args["batch_sizes"], args["lrs"]
    by = {(r["seed"], r["model"], r["batch_size"], r["lr"]): r for r in rows}
    keys = [(m, b, lr) for m in MODELS for b in bss for lr in lrs]
    seeds = [s for s in range(args["seeds"]) if all((s, *k) in by for k in keys)]
    result: dict = {"args": args, "command": command, "task": TASK, "seeds": seeds, "n_runs": len(rows),
                    "cells": {}, "contrasts": [], "best": {}, "majority": [], "parameters": {}}
    # Cells: every finished run's figures, the intervals over the complete seeds.
    for m, b, lr in keys:
        done = [s for s in range(args["seeds"]) if (s, m, b, lr) in by]
        cell: dict = {"model": m, "batch_size": b, "lr": lr, "examples_seen": args["steps"] * b, "seeds": done}
        for fig in (*FIGURES, "final_train_ce", "rank_top_share", "exact_match_top_share", "ll_gap_sd"):
            vals = [by[(s, m, b, lr)][fig] for s in done]
            mean, half = interval(vals) if vals else (math.nan, math.nan)
            cell[fig] = {"per_seed": vals, "mean": mean, "half": half}
        result["cells"][f"{m}/{cell_name(b, lr)}"] = cell
    for m in MODELS:
        r = next((x for x in rows if x["model"] == m), None)
        if r:
            result["parameters"][m] = {"trainable": r["trainable"], "total": r["total"]}
    if not seeds:
        return result
    result["majority"] = [by[(s, SPARSE, bss[0], lrs[0])]["majority"] for s in seeds]
    for spec in contrast_specs(bss, lrs):
        entry: dict = {k: spec[k] for k in ("name", "kind", "model", "loss_side", "what")}
        involved = [k for k in keys if spec["model"] is None or k[0] == spec["model"]]
        for fig in FIGURES:
            per = [spec["fn"]({k: by[(s, *k)][fig] for k in keys}) for s in seeds]
            mean, half = interval(per)
            side = side_for(fig, spec["loss_side"])
            constant = fig != "gold_loss" and all(by[(s, *k)][f"{fig}_top_share"] == 1.0
                                                  for s in seeds for k in involved)
            # Runs that each answer one label for every example differ only by which label: their accuracy
            # difference says nothing about fine-tuning quality, however narrow its interval.
            v = "not resolved at this scale" if constant else verdict(mean, half, side, 0.0)
            entry[fig] = {"per_seed": per, "mean": mean, "half": half, "side": side, "verdict": v,
                          "constant": constant}
        result["contrasts"].append(entry)
    for m in MODELS:
        cells = [(c["gold_loss"]["mean"], name) for name, c in result["cells"].items()
                 if c["model"] == m and not math.isnan(c["gold_loss"]["mean"])]
        if cells:
            loss, name = min(cells)
            c = result["cells"][name]
            result["best"][m] = {"cell": name, "batch_size": c["batch_size"], "lr": c["lr"], "gold_loss": loss,
                                 "rank": c["rank"]["mean"], "exact_match": c["exact_match"]["mean"]}
    return result


# -- output ---------------------------------------------------------------------------------------------------------

RUN_FIELDS = ["seed", "model", "batch_size", "lr", "steps", "examples_seen", "dropout", "expert_dropout", "gold_loss",
              "rank", "exact_match", "majority", "majority_answer", "n_test", "n_train", "rank_top_share",
              "exact_match_top_share", "ll_gap_sd", "final_train_ce", "skipped_steps", "trainable", "total",
              "checkpoint_step", "max_input_tokens", "train_time_s", "wall_seconds", "out_dir"]


def write_results(rows: list[dict], out: Path, args: dict, command: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RUN_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(out / "runs.csv", buf.getvalue())
    result = summarise(rows, args, command)
    atomic_write_text(out / "results.json", json.dumps(_json_safe(result), indent=1) + "\n")
    atomic_write_text(out / "results.md", "\n".join(render_tables(result, TITLE)) + "\n")
    return result


def _verdict_cell(v: dict) -> str:
    text = v["verdict"] + (" (constant predictors)" if v.get("constant") else "")
    return text if v["verdict"].startswith("not resolved") else f"**{text}**"


def _ci(v: dict, spec: str) -> str:
    mean, half = _num(v["mean"]), _num(v["half"])
    if math.isnan(half):
        return "n/a"
    return f"[{fmt(mean - half, '+' + spec)}, {fmt(mean + half, '+' + spec)}]"


def render_tables(result: dict, title: str | None) -> list[str]:
    a = result["args"]
    seeds = result["seeds"]
    lines: list[str] = []
    if title:
        lines += [title, "", f"Command: `{result['command']}`", ""]
    lines += [f"Task {result['task']}; each run: {a['steps']} steps at batch size "
              f"{' or '.join(str(b) for b in a['batch_sizes'])} (so {a['steps'] * min(a['batch_sizes'])} or "
              f"{a['steps'] * max(a['batch_sizes'])} training examples seen), AdamW at constant lr "
              f"{' or '.join(f'{x:g}' for x in a['lrs'])} (no warm-up), every parameter updated, dropout {DROPOUT} "
              f"(expert dropout {EXPERT_DROPOUT} in the sparse model), {a['n_train']} training and {a['n_test']} "
              f"test examples, inputs cut at {a['max_input_tokens']} tokens; ± is the half-width of the 95 % t "
              f"interval over seeds; gold-answer loss in nats per target token (lower is better).", ""]
    if result["parameters"]:
        lines += ["Parameters (all trained): " + "; ".join(
            f"{MODEL_NAMES[m]} {p['total']:,}" for m, p in result["parameters"].items()) + ".", ""]
    if result["majority"]:
        lines += [f"Majority-class baseline (the training split's most frequent answer) per seed "
                  f"{', '.join(str(s) for s in seeds)}: {', '.join(fmt(x, '.3f') for x in result['majority'])}.",
                  ""]
    lines += ["### Cells", "",
              "Per seed values are listed in seed order; top share: the share of the test examples given the run's "
              "most frequent answer, rank / exact match, per seed (1.000: one label for every example); train CE: "
              "training cross-entropy at the last logged step.", "",
              "| model | batch | lr | examples seen | seeds | gold-answer loss per seed | gold-answer loss mean ± 95 % "
              "| rank per seed | rank mean ± 95 % | exact match per seed | exact match mean ± 95 % | top share "
              "| train CE mean |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"].values():
        if not c["seeds"]:
            continue
        cells = []
        for fig, spec in (("gold_loss", ".4f"), ("rank", ".3f"), ("exact_match", ".3f")):
            cells.append(", ".join(fmt(x, spec) for x in c[fig]["per_seed"]))
            cells.append(f"{fmt(c[fig]['mean'], spec)} ± {fmt(c[fig]['half'], spec)}")
        shares = ", ".join(f"{fmt(r, '.2f')}/{fmt(e, '.2f')}" for r, e in zip(
            c["rank_top_share"]["per_seed"], c["exact_match_top_share"]["per_seed"], strict=True))
        lines.append(f"| {c['model']} | {c['batch_size']} | {c['lr']:g} | {c['examples_seen']:,} | "
                     f"{','.join(str(s) for s in c['seeds'])} | " + " | ".join(cells)
                     + f" | {shares} | {fmt(c['final_train_ce']['mean'], '.4f')} |")
    lines.append("")
    if not result["contrasts"]:
        lines += ["No seed has all of its runs yet: no contrasts.", ""]
        return lines
    head = " | ".join(f"seed {s}" for s in seeds)
    lines += ["### Contrasts (paired by seed)", "",
              "Benefit of a setting = figure at that setting minus figure at the other, averaged over the other "
              "factor's two levels; interaction = sparse benefit minus dense benefit. Paper's side: the sign the "
              "claim predicts (for the loss, negative = the setting lowers the loss; for accuracy, positive).", "",
              f"| contrast | figure | {head} | mean ± 95 % | 95 % interval | paper's side | verdict |",
              "|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for e in result["contrasts"]:
        for fig in FIGURES:
            v = e[fig]
            spec = ".4f" if fig == "gold_loss" else ".3f"
            per = " | ".join(fmt(x, "+" + spec) for x in v["per_seed"])
            lines.append(f"| {e['name']} | {FIGURE_NAMES[fig]} | {per} | {fmt(v['mean'], '+' + spec)} ± "
                         f"{fmt(v['half'], spec)} | {_ci(v, spec)} | {'< 0' if v['side'] == 'neg' else '> 0'} | "
                         f"{_verdict_cell(v)} |")
    lines.append("")
    if result["best"]:
        lines += ["### Best cell per model (lowest mean gold-answer loss; descriptive, no interval)", "",
                  "| model | best cell | gold-answer loss | rank | exact match |", "|---|---|---|---|---|"]
        for m, b in result["best"].items():
            lines.append(f"| {MODEL_NAMES[m]} | batch {b['batch_size']}, lr {b['lr']:g} | {fmt(b['gold_loss'], '.4f')}"
                         f" | {fmt(b['rank'], '.3f')} | {fmt(b['exact_match'], '.3f')} |")
        lines.append("")
    return lines


def _supports(v: dict) -> str:
    """What one contrast's interval supports, in words."""
    if math.isnan(_num(v["half"])) or math.isnan(_num(v["mean"])):
        return "no interval (fewer than two seeds or a non-finite figure)"
    if v.get("constant"):
        return "every run involved is a constant predictor, so the difference only says which label a prior leans to"
    if v["verdict"] == "reproduced":
        return "the interval lies wholly on the paper's side of zero"
    if v["verdict"] == "contradicted":
        return "the interval lies wholly on the side of zero opposite to the paper's"
    return "the interval includes zero and supports neither direction"


def _sentence(e: dict) -> str:
    def figure(fig: str) -> str:
        v = e[fig]
        spec = ".4f" if fig == "gold_loss" else ".3f"
        unit = " nats" if fig == "gold_loss" else ""
        return f"{FIGURE_NAMES[fig]} {fmt(v['mean'], '+' + spec)} ± {fmt(v['half'], spec)}{unit} {_ci(v, spec)}"

    parts = [f"{figure('gold_loss')}, {e['gold_loss']['verdict']} ({_supports(e['gold_loss'])})"]
    if e["rank"]["constant"] and e["exact_match"]["constant"]:
        parts.append(f"{figure('rank')} and {figure('exact_match')}, both {e['rank']['verdict']} (every run "
                     "involved is a constant predictor, so they only say which label a prior leans to)")
    else:
        parts += [f"{figure(fig)}, {e[fig]['verdict']} ({_supports(e[fig])})" for fig in ("rank", "exact_match")]
    return f"{e['what']}: " + "; ".join(parts) + "."


def render_section(result: dict, out: str, notes: str = "") -> str:
    a = result["args"]
    rel = out.removeprefix("docs/")
    small, large = sorted(a["batch_sizes"])
    low, high = sorted(a["lrs"])
    lines = [
        SECTION,
        "",
        "**Question.** ST-MoE (Zoph et al. 2022, section 4, fine-tuning): sparse models prefer smaller batch sizes "
        "and higher learning rates when fine-tuning, dense models the opposite (larger batches, lower learning "
        "rates). Does the sparse encoder-decoder here gain more from a smaller batch and from a higher learning rate "
        "than its FLOP-matched dense counterpart?",
        "",
        "**Setup.** The models are the `switch` (configs/switch-t5-tiny.toml: top-1 of 8 experts in every other "
        "FFN of both stacks) and `t5_dense` (t5-dense-tiny, FLOP-matched dense T5) runs of \"Encoder-decoder "
        "pre-training at matched FLOPs\" above, seeds 0-2, pre-trained for only 300 steps of span corruption on the "
        "built-in corpus (final validation loss about 5.2 nats per target token for both). Each seed's two models are "
        "fine-tuned (`moekit.lab.seq2seq_finetune.finetune_seq2seq`, what `moekit finetune-seq2seq` runs) on task "
        f"`{result['task']}` in a 2 x 2 grid: batch size {small} or {large} x constant learning rate {low:g} or "
        f"{high:g} (AdamW, no warm-up, weight decay 0, gradient clip 1.0: the command's defaults otherwise), every "
        f"parameter updated, dropout {DROPOUT} and, in the sparse model, expert dropout {EXPERT_DROPOUT} (arm `all` "
        "of the section above; the pre-training used no dropout). "
        f"Every run takes {a['steps']} steps, so a batch of {large} sees {large // small}x the examples of a batch "
        f"of {small} ({a['steps'] * large:,} against {a['steps'] * small:,}, of {a['n_train']:,} training "
        "examples), as fine-tuning at a fixed step count does; a fixed-examples variant was not run. "
        f"{a['n_train']} training and {a['n_test']} test examples (the split of the section above for the seed), "
        f"inputs cut at {a['max_input_tokens']} tokens, one torch thread per run. "
        "Seeds paired: the pre-training seed is the fine-tuning seed, so the runs of a seed start from the same "
        "weights per model and see the same examples in the same order and the same test examples. Figures per "
        "run: the test cross-entropy of the gold answer (primary: continuous, while the accuracies at this scale "
        "are often those of a constant predictor), rank-classification accuracy and exact match of greedy "
        "decoding. Contrasts paired by seed with 95 % t intervals over the seeds (3 seeds: 2 df, t = 4.303): the "
        f"small-batch benefit M(batch {small}) - M(batch {large}), averaged over the two learning rates, and the "
        f"high-learning-rate benefit M(lr {high:g}) - M(lr {low:g}), averaged over the two batch sizes, per model; "
        "and the interactions "
        "that carry the claim, sparse benefit minus dense benefit. The paper's side is negative for the loss and "
        "positive for accuracy (for the dense model's own benefits the opposite); \"reproduced\" when the interval "
        "excludes zero on the paper's side, \"contradicted\" when it excludes zero on the other side, otherwise "
        "\"not resolved at this scale\" (also, for an accuracy, when every run in the contrast is a constant "
        "predictor).",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        f"Results ([{out}/results.md]({rel}/results.md); every run in [runs.csv]({rel}/runs.csv)):",
        "",
    ]
    lines += render_tables(result, None)
    sentences = [_sentence(e) for e in result["contrasts"]]
    if sentences:
        lines += ["**Verdicts.** " + " ".join(sentences), ""]
    lines += [
        "**Limits.** These models know little language (300 pre-training steps), so fine-tuning here mostly fits "
        "the answer format and a label prior; the claim is about transferring well pre-trained models. The batch "
        f"contrast is confounded with the number of examples seen (fixed steps: batch {large} sees "
        f"{large // small}x the examples), which favours the larger batch in both models; the interaction removes "
        "what the two models share of that, not what differs. Two levels per factor, one task, 3 seeds (2 df): "
        "only large effects can exclude zero. The dense model has fewer parameters (FLOP-matched, not "
        "parameter-matched) and no expert dropout, so \"sparse vs dense\" here also differs in those.",
        "",
    ]
    if notes:
        lines += [*notes.strip().splitlines(), ""]  # line by line: the wrapping below keeps its paragraphs
    wrapped = []
    for line in lines:
        if line.startswith(("|", "```", "!", "#", "python")) or len(line) <= 118:
            wrapped.append(line)
        else:
            wrapped.extend(_wrap(line))
    return "\n".join(wrapped)


def _wrap(text: str, width: int = 118) -> list[str]:
    """``textwrap.wrap``, but no line starts with "- ", "+ " or "* " (markdown would read it as a list item): such a
    sign moves up to the end of the line before."""
    out: list[str] = []
    for line in textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False):
        if out and line[:2] in ("- ", "+ ", "* "):
            out[-1] += " " + line[0]
            line = line[2:]
        out.append(line)
    return out


def write_section(results_md: Path, out: Path, notes: Path | None) -> None:
    result = json.loads((out / "results.json").read_text())
    section = render_section(result, str(out), notes.read_text() if notes else "")
    replace_section(results_md, SECTION, section)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/results/seq2seq_finetune_sensitivity")
    p.add_argument("--runs", default="/tmp/s2s-sensitivity-runs", help="where the fine-tuning runs go")
    p.add_argument("--pretrained", default="/tmp/s2s-pretraining-runs",
                   help="seq2seq_pretraining.py's --runs (seed{N}/switch and seed{N}/t5_dense; read only)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps, the same for every run")
    p.add_argument("--batch-sizes", type=_ints, default=[8, 32], help="two, comma-separated (small,large)")
    p.add_argument("--lrs", type=_floats, default=[1e-4, 1e-3], help="two, comma-separated (low,high)")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--max-input-tokens", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="runs at a time (one thread each)")
    p.add_argument("--section", default=None, metavar="RESULTS_MD",
                   help="train nothing: write this script's section of RESULTS_MD from --out/results.json")
    p.add_argument("--notes", default=None, help="with --section: a markdown file appended to the section")
    args = p.parse_args(argv)
    if args.section:
        write_section(Path(args.section), Path(args.out), Path(args.notes) if args.notes else None)
        log(f"wrote the {SECTION!r} section of {args.section}")
        return 0
    if len(args.batch_sizes) != 2 or len(set(args.batch_sizes)) != 2:
        p.error("--batch-sizes needs two different values")
    if len(args.lrs) != 2 or len(set(args.lrs)) != 2:
        p.error("--lrs needs two different values")
    args.batch_sizes, args.lrs = sorted(args.batch_sizes), sorted(args.lrs)
    command = ("python benchmarks/repro/seq2seq_finetune_sensitivity.py "
               + " ".join(argv if argv is not None else sys.argv[1:]))
    recorded = {k: v for k, v in vars(args).items() if k not in ("section", "notes", "workers")}
    seeds = list(range(args.seeds))
    jobs = make_jobs(args, seeds)
    runs = Path(args.runs)
    t0 = time.perf_counter()
    log(f"{len(jobs)} runs, {args.workers} at a time, into {runs}")
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_one, job): job for job in jobs}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            s = fut.result()
            log(f"seed {job['seed']} {job['model']} bs {job['batch_size']} lr {job['lr']:g}: gold loss "
                f"{_num(s['final_val_loss']):.4f}, rank {s['rank']:.3f}, exact match {s['exact_match']:.3f}, "
                f"majority {s['majority']:.3f} (train {_num(s['train_time_s']):.0f}s, wall "
                f"{_num(s['wall_seconds']):.0f}s; {time.perf_counter() - t0:.0f}s so far)")
            rows = collect(runs, seeds, args.batch_sizes, args.lrs)
            write_results(rows, Path(args.out), recorded, command)
    rows = collect(runs, seeds, args.batch_sizes, args.lrs)
    write_results(rows, Path(args.out), recorded, command)
    log(f"wrote {args.out}/results.md ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
