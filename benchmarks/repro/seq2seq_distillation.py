"""Distilling the sparse encoder-decoder into its FLOP-matched dense T5 (Switch Transformer, Fedus et al. 2021,
section 4.2): does a dense student trained on the teacher's soft targets end better than the same dense model trained
on the labels alone for the same steps?

The teachers and dense baselines are the runs of ``benchmarks/repro/seq2seq_pretraining.py`` (read only):
``switch`` (configs/switch-t5-tiny.toml) and ``t5_dense`` (configs/t5-dense-tiny.toml, its FLOP-matched dense
model), one pair per seed, pre-trained on the same span-corruption examples. Per seed, three arms train ``--steps``
more steps, every one with the same fresh batches (``train.seed`` = the pre-training seed + 1: other windows and
other span masks than the pre-training saw) and the same schedule (the configs' lr 3e-3, AdamW, linear warm-up over
10 % of the steps, cosine to 0.1 x lr):

- ``distilled``: ``moekit distill`` (``moekit.lab.distill.run.distill_run``): the dense student starts from the
  teacher's non-expert weights with each expert FFN replaced by the usage-weighted mean of its experts (``--init
  mean``), trained on ``0.75 * CE(labels) + 0.25 * CE(teacher)`` (Switch's mixture);
- ``labels_only``: the same student, the same start, ``--hard-weight 1.0`` (the teacher term off), so
  ``distilled - labels_only`` isolates what the teacher's soft targets add;
- ``dense_continued``: the dense baseline continues for the same steps on the labels (a run started from its
  weights, ``start_run_from_weights``), the control Switch's comparison needs: a dense model given the same extra
  training.

Paired by seed, 95 % t intervals over seeds; the paper's side is negative for ``distilled - dense_continued``
(Switch: the distilled dense model keeps about 30 % of the sparse teacher's quality gain over the dense baseline)
and for ``distilled - labels_only``. Also reported: the gain the teacher has to give (``teacher - dense`` before
the extra steps) and the share kept, ``(L_dense_continued - L_distilled) / (L_dense_continued - L_teacher)``
(descriptive only: undefined when the teacher is no better than the control).

Usage (one thread; the machine is shared)::

    python benchmarks/repro/seq2seq_distillation.py --pretrained /tmp/s2s-pretraining-runs \\
        --runs /tmp/s2s-distill-runs --out docs/results/seq2seq_distillation --steps 200

Finished runs (``summary.json``) are skipped on a rerun; ``runs.csv``, ``results.json`` and ``results.md`` are
rewritten into ``--out`` after every seed. ``--section docs/RESULTS.md`` (with ``--notes FILE``) writes or replaces
the section "Distilling the sparse encoder-decoder (Switch section 4.2)" from ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from moekit.atomic import atomic_write_text
from moekit.lab.distill.run import distill_run
from moekit.lab.runtime import tune_malloc
from moekit.lab.training.run import load_trained_run, start_run_from_weights, train_run
from moekit.lab.training.run_config import build_run_config
from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE
from moekit.training.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, replace_section, wrap_markdown  # noqa: E402  (shared with the other scripts)
from seq2seq_pretraining import verdict  # noqa: E402

ARMS = ("distilled", "labels_only", "dense_continued")
SECTION = "## Distilling the sparse encoder-decoder (Switch section 4.2)"
PAPER = {
    "distilled - dense_continued": "the distilled dense model ends better than the dense model trained as long on "
                                   "the labels",
    "distilled - labels_only": "the teacher's soft targets improve the student over labels alone",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet(msg: str) -> None:
    pass


def train_overrides(steps: int, eval_every: int) -> dict:
    """The [train] values every arm shares (the pre-training's schedule, rescaled to ``steps``)."""
    return {"max_steps": steps, "warmup_steps": max(1, round(0.1 * steps)), "eval_every": eval_every,
            "eval_batches": None, "checkpoint_every": 0, "keep_checkpoints": 2, "log_every": 1,
            "progress": "off", "threads": 1}


def _set_list(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        text = '"none"' if v is None else json.dumps(v)
        out.append(f"train.{k}={text}")
    return out


def summary_of(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def curve_of(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["val_loss"])) for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


def continue_dense(dense_dir: Path, run_dir: Path, seed: int, shared: dict) -> None:
    """A run that starts from the dense baseline's weights and trains on the fresh batches with the shared
    schedule: the same [model] and [data] as the baseline, ``train.seed = seed``."""
    base = load_trained_run(dense_dir, command="distill")
    tables = base.config.resolved()
    tables["train"].update(shared, seed=seed, init_from=None)
    cfg = build_run_config(tables)
    for name in (TOKENIZER_FILE, TOKENS_FILE):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dense_dir / name, run_dir / name)
    start_run_from_weights(cfg, run_dir, base.model)
    train_run(None, run_dir, resume=True, log=quiet)


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    teacher = Path(args.pretrained) / f"seed{seed}" / "switch"
    dense = Path(args.pretrained) / f"seed{seed}" / "t5_dense"
    runs = Path(args.runs) / f"seed{seed}"
    shared = train_overrides(args.steps, args.eval_every)
    fresh_seed = seed + 1
    row: dict = {"seed": seed, "teacher_run": str(teacher), "dense_run": str(dense)}
    for arm, hard in (("distilled", 0.75), ("labels_only", 1.0)):
        run_dir = runs / arm
        if summary_of(run_dir) is None or not (run_dir / "distill.json").is_file():
            if run_dir.exists():  # an unfinished run of an interrupted session starts again
                shutil.rmtree(run_dir)
            log(f"seed {seed}: {arm} ({args.steps} steps, label weight {hard})")
            distill_run(teacher, run_dir, init="mean", dense_baseline=dense, hard_weight=hard,
                        overrides=_set_list({**shared, "seed": fresh_seed}), log=quiet)
        info = json.loads((run_dir / "distill.json").read_text())
        row[arm] = info["student_val_loss"]
        row[f"{arm}_init"] = info["student_init_val_loss"]
        row[f"{arm}_seconds"] = info["train_seconds"]
        row[f"{arm}_curve"] = curve_of(run_dir)
        row["teacher"] = info["teacher_val_loss"]
        row["dense"] = info["dense_baseline_val_loss"]
        row["student_data_seed"] = info["student_data_seed"]
        row["teacher_parameters"], row["student_parameters"] = info["teacher_parameters"], info["student_parameters"]
        row["teacher_flops"] = info["teacher_forward_flops_per_target_token"]
        row["student_flops"] = info["student_forward_flops_per_target_token"]
        log(f"seed {seed}: {arm} {info['student_val_loss']:.4f} (start {info['student_init_val_loss']:.4f}; "
            f"teacher {info['teacher_val_loss']:.4f}, dense {info['dense_baseline_val_loss']:.4f})")
    run_dir = runs / "dense_continued"
    if summary_of(run_dir) is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log(f"seed {seed}: dense_continued ({args.steps} steps)")
        continue_dense(dense, run_dir, fresh_seed, shared)
    s = summary_of(run_dir)
    row["dense_continued"] = s["final_val_loss"]
    row["dense_continued_seconds"] = s["train_time_s"]
    row["dense_continued_curve"] = curve_of(run_dir)
    # The control's validation examples must be the students' (same split, same fixed masks): its loss at step 0 of
    # the continuation is not logged, so compare its data files and [data] section with the teacher's instead.
    if (run_dir / TOKENS_FILE).read_bytes() != (teacher / TOKENS_FILE).read_bytes():
        raise SystemExit(f"{run_dir}: other tokens than the teacher's")
    log(f"seed {seed}: dense_continued {s['final_val_loss']:.4f}")
    return row


def analyse(rows: list[dict], args: argparse.Namespace, command: str) -> dict:
    result: dict = {"args": dict(vars(args)), "command": command, "seeds": [r["seed"] for r in rows],
                    "per_seed": rows, "arms": {}, "paired": {}}
    for key in ("teacher", "dense", *ARMS):
        m, h = interval([r[key] for r in rows])
        result["arms"][key] = {"per_seed": [r[key] for r in rows], "mean": m, "half": h}
    gap = [r["teacher"] - r["dense"] for r in rows]
    m, h = interval(gap)
    result["teacher_gain"] = {"per_seed": gap, "mean": m, "half": h, "verdict": verdict(m, h)}
    for a, b in (("distilled", "dense_continued"), ("distilled", "labels_only")):
        d = [r[a] - r[b] for r in rows]
        m, h = interval(d)
        result["paired"][f"{a} - {b}"] = {"per_seed": d, "mean": m, "half": h, "verdict": verdict(m, h)}
    kept = []
    for r in rows:
        gain = r["dense_continued"] - r["teacher"]
        kept.append((r["dense_continued"] - r["distilled"]) / gain if gain > 0 else None)
    result["gain_kept"] = kept
    return result


def table_lines(result: dict) -> list[str]:
    seeds = result["seeds"]
    names = {
        "teacher": "teacher: switch-t5-tiny after pre-training",
        "dense": "dense baseline: t5-dense-tiny after pre-training",
        "distilled": "distilled student (0.75 labels + 0.25 teacher)",
        "labels_only": "the same student on labels only",
        "dense_continued": "dense baseline continued on labels",
    }
    steps = result["args"]["steps"]
    extra = {"teacher": "0", "dense": "0", "distilled": str(steps), "labels_only": str(steps),
             "dense_continued": str(steps)}
    head = "| model | extra steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % |"
    lines = [head, "|---|---|" + "---|" * len(seeds) + "---|"]
    for key, name in names.items():
        v = result["arms"][key]
        cells = " | ".join(f"{x:.3f}" for x in v["per_seed"])
        lines.append(f"| {name} | {extra[key]} | {cells} | {v['mean']:.3f} ± {v['half']:.3f} |")
    lines += ["", "Paired by seed (the paper's side: below 0):", "",
              "| comparison | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % | verdict |",
              "|---|" + "---|" * len(seeds) + "---|---|"]
    g = result["teacher_gain"]
    lines.append("| teacher - dense baseline, before distillation (the gain to keep) | "
                 + " | ".join(f"{x:+.3f}" for x in g["per_seed"]) + f" | {g['mean']:+.3f} ± {g['half']:.3f} | "
                 + ("the teacher is better" if g["verdict"] == "reproduced" else
                    "the teacher is worse" if g["verdict"] == "contradicted" else "no resolved gap") + " |")
    for name, v in result["paired"].items():
        lines.append(f"| {name} | " + " | ".join(f"{x:+.3f}" for x in v["per_seed"])
                     + f" | {v['mean']:+.3f} ± {v['half']:.3f} | {v['verdict']} |")
    kept = ", ".join("undefined (teacher not better)" if k is None else f"{100 * k:.0f} %" for k in result["gain_kept"])
    lines += ["", f"Share of the teacher's gain over the continued dense model kept by the student, per seed: {kept}."]
    return lines


def render(result: dict) -> str:
    return "\n".join(["# Distilling the sparse encoder-decoder", "", "```sh", result["command"], "```", "",
                      "Validation span-corruption loss (nats per target token, the whole held-out split):", "",
                      *table_lines(result), ""])


def write_results(rows: list[dict], out: Path, args: argparse.Namespace, command: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = analyse(rows, args, command)
    buf = io.StringIO()
    fields = ["seed", "teacher", "dense", *ARMS, "distilled_init", "labels_only_init", "distilled_seconds",
              "labels_only_seconds", "dense_continued_seconds", "student_data_seed", "teacher_run", "dense_run"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "runs.csv", buf.getvalue())
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", render(result))
    return result


def render_section(result: dict, out: str) -> str:
    a, rows = result["args"], result["per_seed"]
    rel = out.removeprefix("docs/")
    n, steps = len(rows), a["steps"]
    r0 = rows[0]
    sec = [r[f"{arm}_seconds"] for r in rows for arm in ARMS]
    sentences = []
    for name, v in result["paired"].items():
        num = f"{v['mean']:+.3f} ± {v['half']:.3f}"
        if v["verdict"] == "reproduced":
            sentences.append(f"{name}: {num} nats, reproduced ({PAPER[name]}).")
        elif v["verdict"] == "contradicted":
            sentences.append(f"{name}: {num} nats, contradicted: the paper's direction is that {PAPER[name]}; "
                             "here the interval excludes zero on the other side.")
        else:
            sentences.append(f"{name}: {num} nats, not resolved at this scale (the paper: {PAPER[name]}).")
    g = result["teacher_gain"]
    lines = [
        SECTION,
        "",
        "**Question** (Fedus et al. 2021, section 4.2): distilling a sparse Switch model into a dense model with the "
        "FLOP count of the sparse model's active path (the student: initialised from the teacher's non-expert "
        "weights, trained on 0.75 x the label loss + 0.25 x the cross-entropy to the teacher's distribution) keeps "
        "about 30 % of the sparse model's quality gain over the dense baseline. The direction to test: the "
        "distilled student ends better than the same dense model given the same extra training on the labels "
        "alone.",
        "",
        f"**Setup.** Teachers and dense baselines are the `switch` and `t5_dense` runs of \"Encoder-decoder "
        f"pre-training at matched FLOPs\" above (seeds {', '.join(str(s) for s in result['seeds'])}, 300 steps each, "
        f"the same examples per seed). Per seed three arms train {steps} more steps with the same fresh batches "
        "(`train.seed` = the pre-training seed + 1: other windows and other span masks) and the same schedule (lr "
        f"3e-3, AdamW, warm-up over {max(1, round(0.1 * steps))} steps, cosine to 3e-4): **distilled** (`moekit "
        "distill --init mean`: the student, t5-dense-tiny's shape, "
        f"{r0['student_parameters'] / 1e6:.2f} M parameters against the teacher's {r0['teacher_parameters'] / 1e6:.2f}"
        " M, starts from the teacher's embeddings, attention, norms, relative position biases and dense FFNs, with "
        "each expert FFN replaced by the usage-weighted mean of its experts, and trains on Switch's 0.75 / 0.25 "
        "mixture); **labels only** (the same student and start, `--hard-weight 1.0`); **dense continued** (the dense "
        "baseline's weights trained on the labels, the control). Forward FLOPs per target token: teacher "
        f"{r0['teacher_flops'] / 1e6:.2f} M, student {r0['student_flops'] / 1e6:.2f} M (the router). Validation: "
        f"the whole held-out split in eval mode (Switch at capacity factor 2.0), every {a['eval_every']} steps. "
        f"{n} seeds, paired; 95 % t intervals ({n - 1} degrees of freedom). One torch thread, runs one after "
        f"another on 2 shared cores: {min(sec):.0f}-{max(sec):.0f} s of training per run (the distilled students "
        "also run the teacher's forward pass).",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        f"Results ([{out}/results.md]({rel}/results.md), every run in [runs.csv]({rel}/runs.csv)); validation "
        "span-corruption loss, nats per target token:",
        "",
        *table_lines(result),
        "",
        f"**What this says.** The teacher - dense gap before distillation is {g['mean']:+.3f} ± {g['half']:.3f} nats. "
        + " ".join(sentences),
        "",
    ]
    return wrap_markdown(lines)


def write_section(results_md: Path, out: Path, notes: Path | None) -> None:
    """Replace (or append) this study's section of ``results_md`` from ``out/results.json`` (+ ``notes``)."""
    result = json.loads((out / "results.json").read_text())
    section = render_section(result, str(out))
    replace_section(results_md, SECTION, section, notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", default="/tmp/s2s-pretraining-runs",
                   help="the runs of seq2seq_pretraining.py (SEED/switch and SEED/t5_dense), read only")
    p.add_argument("--runs", default="/tmp/s2s-distill-runs", help="where the new runs go")
    p.add_argument("--out", default="docs/results/seq2seq_distillation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--section", default=None, metavar="RESULTS_MD",
                   help="train nothing: write this study's section of RESULTS_MD from --out/results.json")
    p.add_argument("--notes", default=None, help="with --section: a markdown file appended to the section")
    args = p.parse_args(argv)
    if args.section:
        result = json.loads((Path(args.out) / "results.json").read_text())
        atomic_write_text(Path(args.out) / "results.md", render(result))
        write_section(Path(args.section), Path(args.out), Path(args.notes) if args.notes else None)
        log(f"wrote the {SECTION!r} section of {args.section}")
        return 0
    torch.set_num_threads(1)
    tune_malloc()
    command = "python benchmarks/repro/seq2seq_distillation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        rows.append(run_seed(seed, args))
        write_results(rows, Path(args.out), args, command)
        log(f"seed {seed} finished; {time.perf_counter() - t0:.0f}s so far")
    return 0


if __name__ == "__main__":
    sys.exit(main())
