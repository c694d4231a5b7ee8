"""Switch scaling (Switch Transformer Fig. 1 and 4): with the same steps and the same FLOPs per token, does a top-1
MoE beat its dense model, do more experts do better, and does the MoE reach the dense model's final loss in fewer
steps?

Switch Fig. 1 / 4 (T5-Base scale): more experts, lower loss at equal steps; Switch-Base with 64 experts reaches the
dense T5-Base's quality 7.5x sooner. The directions checked here, each paired by seed:

1. the final validation loss of MoE(E) minus dense, for E = 2, 8, 32 (paper's side: negative);
2. E = 32 minus E = 2 (paper's side: negative, more experts better);
3. the steps each MoE run takes to reach its dense seed's final loss (on the training curve, below), and the speedup
   ``dense steps / MoE steps`` (paper's side: above 1).

Arms: ``configs/repro/switch-dense.toml`` (a 4-block decoder, d_model 64, d_ff 256 everywhere: the FLOP-matched
dense model) and ``configs/repro/switch-e{2,8,32}.toml`` (the same with top-1 MoE of E experts of d_ff 256 in blocks 1
and 3, router jitter 1e-2, c_B = 1e-2, no z-loss), every MoE run with ``moe.capacity_factor = none``: dropless, so
the number of experts is not confounded with the share of dropped tokens. One learning rate for every arm (AdamW
3e-3, 50 warm-up steps, cosine), not swept per arm. Every run on ``data.corpus = "mixed"`` (docs/DATA.md 3.3; one
tokenizer and one token split shared by every run), ``--steps`` steps of 16 x 128 = 2,048 tokens (1,024, 256 and 64
tokens per expert and step at E = 2, 8, 32, before balancing), ``--seeds`` seeds per arm (paired: seed s of every
arm sees the same batches and starts from the same embedding and block 0; the later blocks' initial weights differ
between arms, because an MoE block draws more from the seeded generator than a dense one). The validation loss on
the whole held-out split is taken at the end.

Steps to the dense loss, on the training curve (every run stays under one epoch, so each training batch is unseen
text and the training cross-entropy estimates the held-out loss at every step): the cross-entropy logged every other
step, averaged over a trailing window of the last 10 % of the run's steps; the target is the dense seed's value of
that average at its last step; the MoE run's step is the first at which its trailing average comes down to the
target (a run that never does is counted as not reached). The dense run gets there at its last step by definition.
The speedup's interval is the 95 % t interval of the mean per-seed log ratio ``log(dense steps / MoE steps)``,
reported as the geometric mean ratio with ``exp`` of the interval's ends; it is scored only when every seed reached
the target.

Gate scale: the mean top-1 gate (``mean_gate`` in metrics.jsonl: the mean over kept tokens of the top-1 router
probability that multiplies the expert output, averaged over the MoE layers), at the end of training (mean of the
logged training steps in the last 10 % of the run), against 1/E for a uniform router; with dropless top-1 and
Switch's unnormalised gate this is the factor the expert output is scaled by.

A direction is "reproduced" when the interval excludes 0 (1 for the speedup) on the paper's side, "contradicted" when
it excludes it on the other, otherwise "not resolved at this scale". The seed noise of the setup (the standard
deviation of an arm's final loss over seeds) is printed with the table.

Usage (runs in parallel, one thread each; the defaults take about 40 minutes on 2 free cores)::

    python benchmarks/repro/switch_scaling.py --out docs/results/switch_scaling [--runs runs/switch-scaling] [--jobs 2]
    python benchmarks/repro/switch_scaling.py --out docs/results/switch_scaling --section docs/RESULTS.md

Finished runs (``summary.json``) are skipped on a rerun; ``results.json``, ``runs.csv``, ``results.md`` and
``loss.png`` are written into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, log, prepare_shared_data, run_all, study_main, study_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "repro"
EXPERTS = (2, 8, 32)
ARMS = ("dense", *(f"e{e}" for e in EXPERTS))
HEADING = "## Switch scaling: dense vs top-1 MoE with 2, 8, 32 experts (Switch Fig. 1, 4)"
TOKENS_PER_STEP = 16 * 128
PLOT, PLOT_ALT = "loss.png", "loss, Switch scaling (paired by seed)"
END_SHARE = 0.1  # the gate "at the end": the logged training steps of the last 10 % of the run


def experts_of(arm: str) -> int:
    """0 for the dense arm, E for ``eE``."""
    return 0 if arm == "dense" else int(arm[1:])


def config_of(arm: str) -> str:
    return str(CONFIGS / f"switch-{'dense' if arm == 'dense' else arm}.toml")


# -- statistics --------------------------------------------------------------------------------------------------
def trailing_mean(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """``(step, mean of the losses logged at steps in (step - window, step])``) for every logged step of ``curve``
    from the first at which a whole window has been logged (step >= window)."""
    points = sorted(curve)
    out = []
    for step, _ in points:
        if step >= window:
            inside = [x for s, x in points if step - window < s <= step]
            out.append((step, statistics.fmean(inside)))
    return out


def steps_to_target(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step of ``curve`` (``(step, loss)`` points) whose loss is at or below ``target``; None if never."""
    return next((float(step) for step, loss in sorted(curve) if loss <= target), None)


def end_mean(records: list[dict], key: str, steps: int) -> float | None:
    """Mean of ``key`` over the logged training steps in the last ``END_SHARE`` of a run of ``steps`` steps (the
    last logged value when none falls in that window); None when no record has it."""
    values = [(r["step"], r[key]) for r in records if key in r]
    if not values:
        return None
    tail = [v for s, v in values if s > steps * (1 - END_SHARE)]
    return statistics.fmean(tail) if tail else values[-1][1]


# -- runs --------------------------------------------------------------------------------------------------------
def overrides(arm: str, seed: int, args: argparse.Namespace) -> list[str]:
    moe = [] if arm == "dense" else ["moe.capacity_factor='none'"]
    return [
        *data_overrides(args),
        *moe,
        f"train.seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        "train.eval_batches='none'",
        "train.log_every=2",
        "train.checkpoint_every=0",
        "train.threads=1",
        "train.progress='off'",
    ]


def row_of(arm: str, seed: int, run: dict, steps: int) -> dict:
    """What the study keeps of a finished run (:func:`_runs.run_one`'s result)."""
    summary, records = run["summary"], run["records"]
    window = max(1, round(steps * END_SHARE))
    curve = trailing_mean([(r["step"], r["ce_loss"]) for r in records if "ce_loss" in r], window)
    drops = [r["drop_fraction"] for r in records if "drop_fraction" in r]
    return {
        "arm": arm,
        "experts": experts_of(arm),
        "seed": seed,
        "final_val_loss": summary["final_val_loss"],
        "unigram_val_loss": summary.get("unigram_val_loss"),
        "mean_gate_end": end_mean(records, "mean_gate", steps),
        "mean_drop_fraction": statistics.fmean(drops) if drops else 0.0,
        "parameters_total": summary.get("parameters_total"),
        "train_flops_per_token": summary.get("train_flops_per_token"),
        "train_time_s": summary.get("train_time_s"),
        "run_dir": run["run_dir"],
        "curve": curve,
    }


def study(args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    keys = [(arm, s) for s in range(args.seeds) for arm in ARMS]
    jobs = [(str(runs / f"{arm}-seed{s}"), config_of(arm), overrides(arm, s, args)) for arm, s in keys]
    data = prepare_shared_data(runs, jobs[0][1], jobs[0][2])
    log(f"{len(jobs)} runs, {args.jobs} at a time")
    done = run_all(jobs, data, args.jobs)
    rows = [row_of(arm, s, r, args.steps) for (arm, s), r in zip(keys, done, strict=True)]
    return {"config": {k: v for k, v in vars(args).items() if k != "section"}, "rows": rows}


# -- analysis ----------------------------------------------------------------------------------------------------
def analyse(result: dict) -> dict:
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["arm"], r["seed"]): r for r in rows}
    loss = {k: r["final_val_loss"] for k, r in by.items()}
    per_arm = {a: [loss[a, s] for s in seeds] for a in ARMS}
    means = {a: interval(per_arm[a]) for a in ARMS}
    spread = {a: statistics.stdev(per_arm[a]) if len(seeds) > 1 else math.nan for a in ARMS}
    gates = {}
    for a in ARMS[1:]:
        values = [by[a, s]["mean_gate_end"] for s in seeds if by[a, s]["mean_gate_end"] is not None]
        gates[a] = interval(values) if values else (math.nan, math.nan)
    drops = {a: statistics.fmean(by[a, s]["mean_drop_fraction"] for s in seeds) for a in ARMS}

    def paired(a: str, b: str, paper: str, why: str) -> dict:
        d = [loss[a, s] - loss[b, s] for s in seeds]
        m, h = interval(d)
        return {
            "a": a,
            "b": b,
            "mean": m,
            "half": h,
            "per_seed": d,
            "paper": f"{paper} ({why})",
            "verdict": verdict(m, h, -1 if paper == "negative" else +1),
        }

    claims = [paired(f"e{e}", "dense", "negative", "the MoE lower at equal steps") for e in EXPERTS]
    claims.append(paired(f"e{EXPERTS[-1]}", f"e{EXPERTS[0]}", "negative", "more experts lower"))

    # Steps to the dense seed's final (trailing-average training) loss, and the speedup dense steps / MoE steps (the
    # dense run gets there at its last step by definition).
    dense_end = {s: max(by["dense", s]["curve"]) for s in seeds}  # (last step, its trailing average)
    dense_steps = {s: dense_end[s][0] for s in seeds}
    per_run = {f"dense/{s}": {"steps_to_dense_loss": float(dense_steps[s]), "speedup": 1.0} for s in seeds}
    speedups = {}
    for e in EXPERTS:
        a = f"e{e}"
        reach = {s: steps_to_target(by[a, s]["curve"], dense_end[s][1]) for s in seeds}
        for s in seeds:
            r = reach[s]
            per_run[f"{a}/{s}"] = {"steps_to_dense_loss": r, "speedup": None if r is None else dense_steps[s] / r}
        reached = [s for s in seeds if reach[s] is not None]
        logs = [math.log(dense_steps[s] / reach[s]) for s in reached]
        entry: dict = {
            "arm": a,
            "reached": len(reached),
            "runs": len(seeds),
            "steps": interval([reach[s] for s in reached]) if reached else (math.nan, math.nan),
            "log_ratio_per_seed": logs,
        }
        if logs:
            m, h = interval(logs)
            entry.update(
                {"log_mean": m, "log_half": h, "ratio": math.exp(m), "low": math.exp(m - h), "high": math.exp(m + h)}
            )
        if logs and len(reached) == len(seeds):
            entry["verdict"] = verdict(entry["log_mean"], entry["log_half"], +1)
        else:
            entry["verdict"] = f"not resolved at this scale ({len(seeds) - len(reached)} of {len(seeds)} not reached)"
        speedups[a] = entry

    curves = {}
    for a in ARMS:
        at = sorted({st for s in seeds for st, _ in by[a, s]["curve"]})
        pts = []
        for st in at:
            vals = [v for s in seeds for x, v in by[a, s]["curve"] if x == st]
            if len(vals) == len(seeds):
                pts.append((st, *interval(vals)))
        curves[a] = pts
    return {
        "seeds": seeds,
        "means": means,
        "seed_sd": spread,
        "gates": gates,
        "drops": drops,
        "claims": claims,
        "per_run": per_run,
        "speedups": speedups,
        "loss": per_arm,
        "curves": curves,
    }


# -- report ------------------------------------------------------------------------------------------------------
def _pm(m: float, h: float, digits: int = 4) -> str:
    return f"{m:.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")


def _count(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def render(result: dict, stats: dict) -> str:
    cfg = result["config"]
    rows = result["rows"]
    params = {r["arm"]: r.get("parameters_total") for r in rows}
    flops = {r["arm"]: r.get("train_flops_per_token") for r in rows}
    n = len(stats["seeds"])
    lines = [
        HEADING,
        "",
        "```sh",
        "python benchmarks/repro/switch_scaling.py " + cfg["command"],
        "```",
        "",
        f"{n} seeds per arm (paired by seed: the same batches, embedding and first block), "
        f'{cfg["steps"]} steps of 16 x 128 tokens on data.corpus = "{cfg["corpus"]}", '
        "one learning rate (3e-3) for every arm; MoE arms top-1 and dropless (capacity factor none). Validation loss "
        "on the whole held-out split at the end (nats/token; mean and 95 % "
        "interval over seeds; the seed standard deviation is the noise of one run). Mean top-1 gate: the mean over "
        "kept tokens of the router probability that multiplies the expert output, over the last 10 % of training "
        "steps (1/E for a uniform router).",
        "",
        "| arm | parameters | train FLOPs / token | validation loss | seed sd | mean top-1 gate | 1/E | drops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in ARMS:
        m, h = stats["means"][a]
        e = experts_of(a)
        gate = "-" if a == "dense" else _pm(*stats["gates"][a], digits=3)
        lines.append(
            f"| {a} | {_count(params[a])} | {_count(flops[a])} | {_pm(m, h)} | {stats['seed_sd'][a]:.4f} | {gate} | "
            f"{'-' if e == 0 else f'{1 / e:.3f}'} | {stats['drops'][a]:.3f} |"
        )
    lines += [
        "",
        "Paired differences of the final validation loss (first minus second, same seed):",
        "",
        "| difference | mean ± 95 % | paper's side | verdict |",
        "|---|---|---|---|",
    ]
    for c in stats["claims"]:
        lines.append(
            f"| {c['a']} - {c['b']} | {c['mean']:+.4f}"
            + ("" if math.isnan(c["half"]) else f" ± {c['half']:.4f}")
            + f" | {c['paper']} | {c['verdict']} |"
        )
    lines += [
        "",
        "Steps to the dense seed's final loss: on the training cross-entropy (unseen batches) averaged over a "
        f"trailing window of {max(1, round(cfg['steps'] * END_SHARE))} steps, the first step at which the MoE run's "
        "average is at or below the dense seed's average at its last step (the dense run gets there at step "
        f"{cfg['steps']}); speedup = dense steps / MoE steps, geometric mean over seeds with the "
        "95 % interval of the mean log ratio (paper's side: above 1):",
        "",
        "| arm | reached | steps (reached runs) | speedup | 95 % interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for a in ARMS[1:]:
        sp = stats["speedups"][a]
        steps = _pm(*sp["steps"], digits=0) if sp["reached"] else "-"
        ratio = f"{sp['ratio']:.2f}x" if "ratio" in sp else "-"
        span = f"[{sp['low']:.2f}, {sp['high']:.2f}]" if "low" in sp and not math.isnan(sp["low"]) else "-"
        lines.append(f"| {a} | {sp['reached']}/{sp['runs']} | {steps} | {ratio} | {span} | {sp['verdict']} |")
    lines += ["", f"![{PLOT_ALT}]({PLOT})"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    rows = [{**{k: v for k, v in r.items() if k != "curve"}, **stats["per_run"][f"{r['arm']}/{r['seed']}"]}
            for r in result["rows"]]
    write_outputs(out, result, stats, render(result, stats), rows)
    plot(stats, out / PLOT, result["rows"][0].get("unigram_val_loss"))


def plot(stats: dict, path: Path, unigram: float | None) -> None:
    """Left: the trailing-average training loss against step per arm (mean and 95 % band over seeds); middle: the
    final validation loss of each
    MoE minus dense, paired by seed; right: the speedup to the dense final loss (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {"dense": "black", "e2": "tab:blue", "e8": "tab:orange", "e32": "tab:green"}
    for a in ARMS:
        pts = stats["curves"][a]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ms = [p[1] for p in pts]
        hs = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
        left.plot(xs, ms, color=colours[a], marker="o", ms=3, label=a if a == "dense" else f"top-1, E = {a[1:]}")
        left.fill_between(
            xs,
            [m - h for m, h in zip(ms, hs, strict=True)],
            [m + h for m, h in zip(ms, hs, strict=True)],
            color=colours[a],
            alpha=0.2,
            lw=0,
        )
    dense_final = stats["curves"]["dense"][-1][1] if stats["curves"]["dense"] else None
    if dense_final is not None:
        left.axhline(dense_final, color="black", ls=":", lw=1, label="dense at its last step (the target, mean)")
    if unigram is not None:
        left.axhline(unigram, color="grey", ls="--", lw=1, label="unigram (validation)")
    left.set_xlabel("training step")
    left.set_ylabel("training cross-entropy, trailing mean (nats / token)")
    left.set_title("mean and 95 % band over seeds")
    left.legend()

    xs = list(range(len(EXPERTS)))
    names = [str(e) for e in EXPERTS]
    diffs = [c for c in stats["claims"] if c["b"] == "dense"]
    mid.errorbar(
        xs,
        [c["mean"] for c in diffs],
        yerr=[0.0 if math.isnan(c["half"]) else c["half"] for c in diffs],
        color="tab:purple",
        marker="o",
        capsize=3,
        label="MoE minus dense, paired by seed (95 % interval)",
    )
    mid.axhline(0.0, color="black", lw=1)
    mid.set_xticks(xs, names)
    mid.set_xlabel("experts (top-1, dropless)")
    mid.set_ylabel("final validation loss difference (nats / token)")
    mid.set_title("below 0: the MoE better (Switch's side)")
    mid.legend()

    sp = [stats["speedups"][f"e{e}"] for e in EXPERTS]
    ok = [i for i, s in enumerate(sp) if "ratio" in s]
    ratios = [sp[i]["ratio"] for i in ok]
    lows = [sp[i]["ratio"] - sp[i]["low"] if not math.isnan(sp[i]["low"]) else 0.0 for i in ok]
    highs = [sp[i]["high"] - sp[i]["ratio"] if not math.isnan(sp[i]["high"]) else 0.0 for i in ok]
    right.errorbar(
        ok,
        ratios,
        yerr=[lows, highs],
        color="tab:red",
        marker="o",
        capsize=3,
        label="dense steps / MoE steps (geometric mean, 95 % interval)",
    )
    right.axhline(1.0, color="black", lw=1)
    right.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 1, 2 rather than powers of ten
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(plain)
    right.set_xticks(xs, [n + ("" if "ratio" in sp[i] else "\n(not reached)") for i, n in enumerate(names)])
    right.set_xlim(-0.5, len(EXPERTS) - 0.5)
    right.set_xlabel("experts (top-1, dropless)")
    right.set_ylabel("speedup to the dense final loss (log scale)")
    right.set_title("above 1: the MoE gets there sooner (Switch's side)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "runs/switch-scaling", seeds=5, steps=660)
    return study_main(p, argv, HEADING, study, lambda result, args: write(result, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
