"""Capacity factor and top-1 vs top-2 (Switch Transformer Table 1): with the same steps, does top-1 routing beat top-2
at a low capacity factor, and what does raising the capacity factor buy in loss?

Switch Table 1 (at 100k steps, neg. log perplexity, higher is better): top-1 CF 1.0 -1.561, CF 1.25 -1.553; top-2
CF 1.0 -1.572. The direction checked here: at CF 0.5 and 1.0 top-1 ends with the lower validation loss than top-2 at
the same capacity factor and steps. Also reported, without a paper side to score them against: each routing's loss
at CF 0.5, 1.0 and 2.0 against dropless (``capacity_factor = none``), the price of dropping tokens.

Every run is ``configs/repro/cap-top1-cf1.0.toml`` (a 4-block decoder, d_model 64, 8 experts in blocks 1 and 3,
jitter 1e-2, AdamW 3e-3 with a cosine schedule) with ``moe.top_k`` and ``moe.capacity_factor`` set, on
``data.corpus = "mixed"`` (docs/DATA.md 3.3; one tokenizer and one token split shared by every run), ``--steps``
steps of 16 x 128 tokens, ``--seeds`` seeds per arm (paired: seed s of every arm shares its initialisation and its
batches). Reported: the validation loss on the whole held-out split at the end, and paired differences with 95 % t
intervals; a direction is "reproduced" when the interval excludes 0 on the paper's side, "contradicted" when it
excludes 0 on the other, otherwise "not resolved at this scale". The seed noise of the setup (the standard deviation
of one arm's final loss over seeds) is printed with the table.

Usage (runs in parallel, one thread each)::

    python benchmarks/repro/capacity_factor.py --out docs/results/capacity_factor [--runs runs/capacity] [--jobs 2]
    python benchmarks/repro/capacity_factor.py --out docs/results/capacity_factor --section docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, log, prepare_shared_data, run_all, study_main, study_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "repro" / "cap-top1-cf1.0.toml")
FACTORS = ("0.5", "1.0", "2.0", "none")  # "none": dropless
HEADING = "## Capacity factor and top-1 vs top-2 (Switch Table 1)"


def arm_name(k: int, cf: str) -> str:
    return f"top{k}-" + ("dropless" if cf == "none" else f"cf{cf}")


def overrides(k: int, cf: str, seed: int, args: argparse.Namespace) -> list[str]:
    cap = "'none'" if cf == "none" else cf
    return [*data_overrides(args), f"moe.top_k={k}", f"moe.capacity_factor={cap}", f"train.seed={seed}",
            f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.eval_batches='none'",
            "train.checkpoint_every=0", "train.threads=1", "train.progress='off'"]


def study(args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    keys = [(k, cf, s) for s in range(args.seeds) for k in (1, 2) for cf in FACTORS]
    jobs = [(str(runs / f"{arm_name(k, cf)}-seed{s}"), BASE, overrides(k, cf, s, args)) for k, cf, s in keys]
    data = prepare_shared_data(runs, BASE, jobs[0][2])
    log(f"{len(jobs)} runs, {args.jobs} at a time")
    done = run_all(jobs, data, args.jobs)
    rows = []
    for (k, cf, s), r in zip(keys, done, strict=True):
        drops = [x.get("drop_fraction", 0.0) for x in r["records"]]
        rows.append({"arm": arm_name(k, cf), "top_k": k, "capacity_factor": cf, "seed": s,
                     "final_val_loss": r["summary"]["final_val_loss"],
                     "unigram_val_loss": r["summary"].get("unigram_val_loss"),
                     "mean_drop_fraction": statistics.fmean(drops) if drops else 0.0,
                     "train_flops_per_token": r["summary"].get("train_flops_per_token"),
                     "run_dir": r["run_dir"]})
    return {"config": {k: v for k, v in vars(args).items() if k != "section"}, "rows": rows}


def analyse(result: dict) -> dict:
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    loss = {(r["arm"], r["seed"]): r["final_val_loss"] for r in rows}
    arms = [arm_name(k, cf) for k in (1, 2) for cf in FACTORS]
    means = {a: interval([loss[a, s] for s in seeds]) for a in arms}
    spread = {a: statistics.stdev([loss[a, s] for s in seeds]) if len(seeds) > 1 else float("nan") for a in arms}
    drops = {a: statistics.fmean(r["mean_drop_fraction"] for r in rows if r["arm"] == a) for a in arms}

    def paired(a: str, b: str) -> dict:
        d = [loss[a, s] - loss[b, s] for s in seeds]
        m, h = interval(d)
        return {"a": a, "b": b, "mean": m, "half": h, "per_seed": d}

    claims = []
    for cf in ("0.5", "1.0"):
        c = paired(arm_name(1, cf), arm_name(2, cf))
        claims.append({**c, "paper": "negative (top-1 better at a low capacity factor)",
                       "verdict": verdict(c["mean"], c["half"], -1)})
    costs = [paired(arm_name(k, cf), arm_name(k, "none")) for k in (1, 2) for cf in ("0.5", "1.0", "2.0")]
    per_arm = {a: [loss[a, s] for s in seeds] for a in arms}
    return {"seeds": seeds, "means": means, "seed_sd": spread, "drops": drops, "claims": claims, "costs": costs,
            "loss": per_arm}


def render(result: dict, stats: dict) -> str:
    cfg = result["config"]
    lines = [HEADING, "", "```sh", "python benchmarks/repro/capacity_factor.py " + cfg["command"], "```", "",
             f"{len(stats['seeds'])} seeds per arm, {cfg['steps']} steps of 16 x 128 tokens on data.corpus = "
             f"\"{cfg['corpus']}\"; validation loss on the whole held-out split at the end (nats/token; mean and 95 % "
             "interval over seeds; the seed standard deviation is the noise of one run).", "",
             "| arm | validation loss | seed sd | mean drop fraction (training) |", "|---|---|---|---|"]
    for arm, (m, h) in stats["means"].items():
        lines.append(f"| {arm} | {m:.4f} ± {h:.4f} | {stats['seed_sd'][arm]:.4f} | {stats['drops'][arm]:.3f} |")
    lines += ["", "Paired differences (first minus second, same seed):", "",
              "| difference | mean ± 95 % | paper's side | verdict |", "|---|---|---|---|"]
    for c in stats["claims"]:
        lines.append(f"| {c['a']} - {c['b']} | {c['mean']:+.4f} ± {c['half']:.4f} | {c['paper']} | {c['verdict']} |")
    lines += ["", "What dropping costs (no paper side; positive: the capacity factor loses to dropless):", "",
              "| difference | mean ± 95 % |", "|---|---|"]
    for c in stats["costs"]:
        lines.append(f"| {c['a']} - {c['b']} | {c['mean']:+.4f} ± {c['half']:.4f} |")
    lines += ["", "![validation loss per capacity factor, and top-1 minus top-2 paired by seed](val_loss.png)"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    write_outputs(out, result, stats, render(result, stats), result["rows"])
    plot(stats, out / "val_loss.png", result["rows"][0].get("unigram_val_loss"))


def plot(stats: dict, path: Path, unigram: float | None) -> None:
    """Left: each arm's validation loss; right: what the claim is about, top-1 minus top-2 paired by seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(FACTORS)))
    names = [("dropless" if cf == "none" else cf) for cf in FACTORS]
    for k, colour in ((1, "tab:blue"), (2, "tab:orange")):
        ms = [stats["means"][arm_name(k, cf)] for cf in FACTORS]
        left.errorbar(xs, [m for m, _ in ms], yerr=[h for _, h in ms], color=colour, marker="o", capsize=3,
                      label=f"top-{k} (mean, 95 % interval over seeds)")
    if unigram is not None:
        left.axhline(unigram, color="black", ls="--", lw=1, label="unigram")
    left.set_xticks(xs, names)
    left.set_xlabel("capacity factor")
    left.set_ylabel("validation loss (nats / token)")
    left.legend()
    seeds = stats["seeds"]
    diffs = []
    for cf in FACTORS:
        a, b = arm_name(1, cf), arm_name(2, cf)
        d = [stats["loss"][a][i] - stats["loss"][b][i] for i in range(len(seeds))]
        diffs.append(interval(d))
    right.errorbar(xs, [m for m, _ in diffs], yerr=[h for _, h in diffs], color="tab:purple", marker="o", capsize=3,
                   label="top-1 minus top-2, paired by seed (95 % interval)")
    right.axhline(0.0, color="black", lw=1)
    right.set_xticks(xs, names)
    right.set_xlabel("capacity factor")
    right.set_ylabel("validation loss difference (nats / token)")
    right.set_title("below 0: top-1 better (Switch's side at CF 0.5 and 1.0)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "runs/capacity-factor", seeds=5, steps=600)
    return study_main(p, argv, HEADING, study, lambda result, args: write(result, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
