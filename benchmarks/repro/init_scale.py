"""Init scale 0.1 vs 1.0 (Switch Transformer Table 3): does the reduced initialisation scale give a lower and less
variable early loss?

Switch Table 3 (after 3.5k steps, 3 runs, negative log perplexity): init scale 0.1: -2.72 +- 0.01, 1.0: -3.60 +-
0.68. Two directions are checked: the mean loss is lower at 0.1 (paired by seed, 95 % t interval), and the spread over
seeds is smaller at 0.1 (Levene's test with the median centre, its p-value from a permutation of the arm labels, and
a bootstrap interval of the ratio of standard deviations).

Every run is ``configs/repro/init-0.1.toml`` or ``init-1.0.toml`` (every weight drawn from a truncated normal of std
sqrt(s / fan_in), routers included; top-1 over 8 experts, capacity factor 1.25, jitter 1e-2, no z-loss, AdamW with a
cosine schedule) made deeper (``--layers`` blocks, an MoE block every other one) and without global gradient
clipping, on ``data.corpus = "mixed"``, ``--steps`` steps of 16 x 128 tokens, ``--seeds`` seeds per arm (paired: seed
s of both arms shares its batches and the random stream its weights are drawn from). Reported: the validation loss on
the whole held-out split at the end. Non-finite steps are skipped and counted (``train.nonfinite = "skip"``).

Usage (runs in parallel, one thread each)::

    python benchmarks/repro/init_scale.py --out docs/results/init_scale [--runs runs/init-scale] [--jobs 2]
    python benchmarks/repro/init_scale.py --out docs/results/init_scale --section docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import count_verdict, interval, plot_runs, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, log, prepare_shared_data, run_all, study_main, study_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARMS = {s: str(ROOT / "configs" / "repro" / f"init-{s}.toml") for s in ("0.1", "1.0")}
HEADING = "## Init scale 0.1 vs 1.0 (Switch Table 3)"
COMMON = ["train.grad_clip=0.0", "train.nonfinite='skip'", "train.max_consecutive_skips=100000",
          "train.checkpoint_every=0", "train.threads=1", "train.progress='off'", "train.eval_batches='none'"]


def overrides(seed: int, args: argparse.Namespace) -> list[str]:
    return [*COMMON, *data_overrides(args), f"model.n_layers={args.layers}", f"train.seed={seed}",
            f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"]


# -- statistics --------------------------------------------------------------------------------------------------
def levene(a: list[float], b: list[float]) -> float:
    """Levene's statistic W with the median centre (Brown-Forsythe) for two groups: the one-way ANOVA F of the
    absolute deviations from each group's median."""
    za = [abs(x - statistics.median(a)) for x in a]
    zb = [abs(x - statistics.median(b)) for x in b]
    n, k = len(a) + len(b), 2
    grand = statistics.fmean(za + zb)
    between = len(za) * (statistics.fmean(za) - grand) ** 2 + len(zb) * (statistics.fmean(zb) - grand) ** 2
    within = sum((z - statistics.fmean(za)) ** 2 for z in za) + sum((z - statistics.fmean(zb)) ** 2 for z in zb)
    if within == 0:
        return math.inf if between > 0 else 0.0
    return (n - k) * between / ((k - 1) * within)


def levene_permutation_p(a: list[float], b: list[float], rounds: int = 20000, seed: int = 0) -> float:
    """The share of random relabellings of the pooled values whose W is at least the observed one (the observed
    labelling counted once: (1 + hits) / (1 + rounds))."""
    observed = levene(a, b)
    pooled, rng, hits = a + b, random.Random(seed), 0
    for _ in range(rounds):
        rng.shuffle(pooled)
        hits += levene(pooled[: len(a)], pooled[len(a) :]) >= observed * (1 - 1e-12)
    return (1 + hits) / (1 + rounds)


def sd_ratio_interval(a: list[float], b: list[float], rounds: int = 20000, seed: int = 0) -> tuple[float, float, float]:
    """sd(a) / sd(b) and its 95 % percentile bootstrap interval (seeds resampled with replacement, the same seed
    indices for both arms: the arms are paired)."""
    rng, n = random.Random(seed), len(a)
    ratios = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        sa, sb = statistics.pstdev([a[i] for i in idx]), statistics.pstdev([b[i] for i in idx])
        if sb > 0:
            ratios.append(sa / sb)
    ratios.sort()
    low, high = ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]
    return statistics.stdev(a) / statistics.stdev(b), low, high


# -- the study ---------------------------------------------------------------------------------------------------
def study(args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    keys = [(arm, s) for s in range(args.seeds) for arm in ARMS]
    jobs = [(str(runs / f"init{arm}-seed{s}"), ARMS[arm], overrides(s, args)) for arm, s in keys]
    data = prepare_shared_data(runs, jobs[0][1], jobs[0][2])
    log(f"{len(jobs)} runs, {args.jobs} at a time")
    done = run_all(jobs, data, args.jobs)
    rows, curves = [], {}
    for (arm, s), r in zip(keys, done, strict=True):
        rows.append({"arm": arm, "seed": s, "final_val_loss": r["summary"]["final_val_loss"],
                     "unigram_val_loss": r["summary"].get("unigram_val_loss"),
                     "skipped_steps": r["summary"].get("skipped_steps", 0),
                     "final_train_loss": statistics.fmean(x["ce_loss"] for x in r["records"][-5:]),
                     "run_dir": r["run_dir"]})
        curves[f"{arm}/{s}"] = [(x["step"], x["ce_loss"]) for x in r["records"]]
    return {"config": {k: v for k, v in vars(args).items() if k != "section"}, "rows": rows, "curves": curves}


def analyse(result: dict) -> dict:
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    loss = {(r["arm"], r["seed"]): r["final_val_loss"] for r in rows}
    a, b = [loss["0.1", s] for s in seeds], [loss["1.0", s] for s in seeds]
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, h = interval(d)
    ratio, low, high = sd_ratio_interval(a, b)
    p = levene_permutation_p(a, b)
    # The paper's side: a smaller spread at 0.1 (the ratio below 1).
    spread = count_verdict(p, -1 if ratio < 1 else 1, -1)
    return {"seeds": seeds, "means": {"0.1": interval(a), "1.0": interval(b)},
            "sd": {"0.1": statistics.stdev(a), "1.0": statistics.stdev(b)},
            "diff": {"mean": m, "half": h, "per_seed": d, "verdict": verdict(m, h, -1)},
            "levene": {"W": levene(a, b), "p": p, "verdict": spread},
            "sd_ratio": {"ratio": ratio, "low": low, "high": high},
            "skipped": {arm: sum(r["skipped_steps"] for r in rows if r["arm"] == arm) for arm in ARMS}}


def render(result: dict, stats: dict) -> str:
    cfg = result["config"]
    n = len(stats["seeds"])
    lines = [HEADING, "", "```sh", "python benchmarks/repro/init_scale.py " + cfg["command"], "```", "",
             f"{n} seeds per arm (paired), {cfg['layers']} blocks (an MoE block every other one), no global gradient "
             f"clipping, {cfg['steps']} steps of 16 x 128 tokens on data.corpus = \"{cfg['corpus']}\"; validation "
             "loss on the whole held-out split at the end (nats/token, mean and 95 % interval over seeds).", "",
             "| init scale | validation loss | seed sd | non-finite steps skipped (all seeds) |", "|---|---|---|---|"]
    for arm in ARMS:
        m, h = stats["means"][arm]
        lines.append(f"| {arm} | {m:.4f} ± {h:.4f} | {stats['sd'][arm]:.4f} | {stats['skipped'][arm]} |")
    d, lv, r = stats["diff"], stats["levene"], stats["sd_ratio"]
    lines += ["", "| claim | measured | paper's side | verdict |", "|---|---|---|---|",
              f"| mean: 0.1 - 1.0 (paired) | {d['mean']:+.4f} ± {d['half']:.4f} | negative | {d['verdict']} |",
              f"| spread: sd(0.1) / sd(1.0) | {r['ratio']:.2f} (bootstrap 95 %: {r['low']:.2f} to {r['high']:.2f}); "
              f"Levene W = {lv['W']:.2f}, permutation p = {lv['p']:.3g} | below 1 | {lv['verdict']} |"]
    lines += ["", "![training loss of every run, and the final validation loss of each seed](loss.png)"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    write_outputs(out, result, stats, render(result, stats), result["rows"])
    plot(result, stats, out / "loss.png")


def plot(result: dict, stats: dict, path: Path) -> None:
    """Left: every run's training loss (log scale: nothing clipped); right: the final validation loss of each seed in
    both arms (the spread the claim is about), seed pairs joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"0.1": "tab:blue", "1.0": "tab:red"}
    unigram = result["rows"][0].get("unigram_val_loss")
    plot_runs(left, result["curves"], colours, {a: f"init scale {a}" for a in colours}, unigram)
    loss = {(r["arm"], r["seed"]): r["final_val_loss"] for r in result["rows"]}
    for s in stats["seeds"]:
        right.plot([0, 1], [loss["0.1", s], loss["1.0", s]], color="grey", lw=0.7)
    for x, arm in enumerate(ARMS):
        right.scatter([x] * len(stats["seeds"]), [loss[arm, s] for s in stats["seeds"]], color=colours[arm], zorder=3)
    # No unigram line here: it sits 1.2 nats above every run and would squeeze the spread the claim is about.
    right.set_xticks([0, 1], [f"init scale {a}" for a in ARMS])
    right.set_xlim(-0.5, 1.5)
    right.set_ylabel("final validation loss (nats / token)")
    right.set_title("spread over seeds (lines join a seed's two runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "runs/init-scale", seeds=10, steps=400)
    p.add_argument("--layers", type=int, default=8, help="blocks of the decoder (an MoE block every other one)")
    return study_main(p, argv, HEADING, study, lambda result, args: write(result, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
