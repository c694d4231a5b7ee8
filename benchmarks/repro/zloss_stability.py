"""Router z-loss and update clipping at the edge of stability (ST-MoE section 3, Table 4), with Adafactor as T5 and
ST-MoE ran it (parameter scale on): does the z-loss make loss spikes rarer without costing quality, and does update
clipping at d = 0.1 make them rarer at a cost in quality?

Three phases, every run the same model (``configs/repro/zloss-none.toml``: a 4-block decoder, d_model 64, top-2
routing over 8 experts in blocks 1 and 3, capacity factor 1.25), on ``data.corpus = "mixed"`` (docs/DATA.md 3.3: five
sources, 25 M characters; one tokenizer and one token split shared by every run), Adafactor with
``scale_parameter = true`` (steps of ``lr x max(1e-3, RMS(weight))``), no momentum, an inverse-square-root schedule
after 50 warm-up steps, no global gradient clipping, ``--steps`` steps of 16 x 128 tokens:

1. **Sweep.** The arm without z-loss (update clipping d = 1) at each learning rate of ``--lrs``, ``--sweep-seeds``
   seeds. The *edge* is the lowest rate at which some run spikes; the *stable* rate the one below it.
2. **Edge.** At the edge: no z-loss (``none``), z-loss c_z = 1e-3 (``zloss``), no z-loss with update clipping d = 0.1
   (``clip``); ``--seeds`` seeds each (paired: seed s of every arm shares its initialisation and batches). A run is
   *unstable* when its training loss ever rises more than ``--spike`` nats (0.5) above its running minimum, or turns
   non-finite (the cross-entropy part of the loss, so that the arms compare alike). Per arm the count of unstable
   runs; ``zloss`` and ``clip`` against ``none`` with Fisher's exact test (two-sided). The paper's side: fewer
   unstable runs.
3. **Quality.** At the stable rate, the same three arms and seeds: the validation loss on the whole held-out split
   at the end; paired differences (arm - none) with 95 % t intervals. The paper's side: ``zloss`` slightly better
   (Table 4: -1.741 against -1.755 log perplexity), ``clip`` worse (-4.206).

A direction is "reproduced" when the interval (or Fisher's p < 0.05 for the counts) is on the paper's side,
"contradicted" when on the other, otherwise "not resolved at this scale".

Usage (arms run in parallel, one thread each)::

    python benchmarks/repro/zloss_stability.py --out docs/results/zloss_stability [--runs /tmp/zloss-runs] [--jobs 2]
    python benchmarks/repro/zloss_stability.py --out docs/results/zloss_stability --section docs/RESULTS.md

Finished runs (``summary.json``) are skipped on a rerun; ``results.json``, ``runs.csv``, ``results.md`` and
``loss.png`` are written into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import count_verdict, interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, log, study_main, study_parser  # noqa: E402
from _runs import run_all as runs_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "repro" / "zloss-none.toml"
ARMS = {  # arm -> overrides of the base config
    "none": [],
    "zloss": ["model.z_loss_coef=1e-3"],
    "clip": ["train.update_clip_d=0.1"],
}
COMMON = ["train.scale_parameter=true", "train.nonfinite='skip'", "train.log_every=1",
          "train.threads=1", "train.progress='off'", "train.checkpoint_every=0", "train.max_consecutive_skips=1000"]
HEADING = "## Router z-loss and update clipping at the edge of stability (ST-MoE)"


# -- statistics --------------------------------------------------------------------------------------------------
def fisher_two_sided(a: int, n1: int, b: int, n2: int) -> float:
    """Fisher's exact test of a/n1 vs b/n2 (two-sided: the sum of the probabilities of every table with the same
    margins no more likely than the observed one)."""
    k = a + b

    def p(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, k - x) / math.comb(n1 + n2, k)

    observed = p(a)
    return min(1.0, sum(p(x) for x in range(max(0, k - n2), min(k, n1) + 1) if p(x) <= observed * (1 + 1e-9)))


def spikes(losses: list[float], threshold: float) -> int:
    """Steps whose training loss is more than ``threshold`` above the minimum of the steps before it, or not finite."""
    count, low = 0, math.inf
    for x in losses:
        if not math.isfinite(x) or x > low + threshold:
            count += 1
        if math.isfinite(x):
            low = min(low, x)
    return count


# -- runs --------------------------------------------------------------------------------------------------------
def figures(run: dict) -> dict:
    """What the study reads of a finished run (:func:`_runs.run_one`'s result)."""
    records, summary = run["records"], run["summary"]
    return {
        "run_dir": run["run_dir"],
        # The cross-entropy, not the total: the z-loss arm's total carries its own (growing) z-loss term.
        "losses": [r["ce_loss"] for r in records],
        "max_router_logit": max((r.get("max_router_logit", 0.0) for r in records), default=0.0),
        "final_val_loss": summary.get("final_val_loss"),
        "unigram_val_loss": summary.get("unigram_val_loss"),
        "skipped_steps": summary.get("skipped_steps", 0),
    }


def run_all(jobs: list[tuple[str, list[str]]], data_src: Path | None, workers: int) -> list[dict]:
    """:func:`_runs.run_all` on the base config, each run's figures."""
    return [figures(r) for r in runs_all([(d, str(BASE), o) for d, o in jobs], data_src, workers)]


def overrides_for(arm: str, lr: float, seed: int, args: argparse.Namespace) -> list[str]:
    return [*COMMON, *data_overrides(args), *ARMS[arm], f"train.lr={lr}", f"train.seed={seed}",
            f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.eval_batches='none'"]


# -- the study ---------------------------------------------------------------------------------------------------
def study(args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    lrs = sorted(args.lrs)

    def job(arm: str, lr: float, seed: int) -> tuple[str, list[str]]:
        return str(runs / f"{arm}-lr{lr:g}-seed{seed}"), overrides_for(arm, lr, seed, args)

    # The first run prepares the tokenizer and token arrays; every other run copies them.
    first = job("none", lrs[0], 0)
    log(f"preparing the data with {first[0]}")
    run_all([first], None, 1)
    data_src = Path(first[0])  # its tokenizer and token arrays

    log(f"sweep: none at lr {lrs}, seeds {list(range(args.sweep_seeds))}")
    keys = [(lr, s) for lr in lrs for s in range(args.sweep_seeds)]
    sweep = dict(zip(keys, run_all([job("none", lr, s) for lr, s in keys], data_src, args.jobs), strict=True))
    unstable_at = {lr: sum(spikes(sweep[lr, s]["losses"], args.spike) > 0 for s in range(args.sweep_seeds))
                   for lr in lrs}
    edge = next((lr for lr in lrs if unstable_at[lr] > 0), None)
    result: dict = {"config": vars(args), "sweep": {str(lr): unstable_at[lr] for lr in lrs}, "edge_lr": edge}
    if edge is None:
        log("no learning rate of the sweep spiked: no edge found")
        return result
    stable = lrs[lrs.index(edge) - 1] if lrs.index(edge) > 0 else None
    result["stable_lr"] = stable
    log(f"edge lr {edge} ({unstable_at[edge]}/{args.sweep_seeds} sweep runs unstable), stable lr {stable}")

    phases = {"edge": edge, "quality": stable}
    for phase, lr in phases.items():
        if lr is None:
            continue
        keys = [(arm, s) for arm in ARMS for s in range(args.seeds)]
        figures = dict(zip(keys, run_all([job(arm, lr, s) for arm, s in keys], data_src, args.jobs), strict=True))
        result[phase] = {"lr": lr, "runs": {f"{arm}/{s}": {k: v for k, v in f.items() if k != "losses"} |
                                             {"spikes": spikes(f["losses"], args.spike)}
                                             for (arm, s), f in figures.items()},
                         "losses": {f"{arm}/{s}": f["losses"] for (arm, s), f in figures.items()}}
        log(f"{phase} (lr {lr}) done")
    return result


def analyse(result: dict, args: argparse.Namespace) -> dict:
    """Counts, Fisher tests and paired intervals, with verdicts."""
    out: dict = {}
    seeds = args.seeds
    if "edge" in result:
        runs = result["edge"]["runs"]
        unstable = {arm: sum(runs[f"{arm}/{s}"]["spikes"] > 0 for s in range(seeds)) for arm in ARMS}
        tests = {}
        for arm in ("zloss", "clip"):
            p = fisher_two_sided(unstable[arm], seeds, unstable["none"], seeds)
            # Fewer unstable runs is the paper's side.
            tests[arm] = {"unstable": unstable[arm], "none_unstable": unstable["none"], "p": p,
                          "verdict": count_verdict(p, unstable[arm] - unstable["none"], -1)}
        out["edge"] = {"lr": result["edge"]["lr"], "unstable": unstable, "tests": tests}
    if "quality" in result:
        runs = result["quality"]["runs"]
        diffs = {}
        for arm, paper, side in (("zloss", "better", -1), ("clip", "worse", +1)):
            d = [runs[f"{arm}/{s}"]["final_val_loss"] - runs[f"none/{s}"]["final_val_loss"] for s in range(seeds)]
            m, h = interval(d)
            diffs[arm] = {"mean": m, "half": h, "per_seed": d, "paper": paper, "verdict": verdict(m, h, side)}
        means = {arm: interval([runs[f"{arm}/{s}"]["final_val_loss"] for s in range(seeds)]) for arm in ARMS}
        out["quality"] = {"lr": result["quality"]["lr"], "means": means, "diffs": diffs}
    return out


def render(result: dict, stats: dict, args: argparse.Namespace) -> str:
    lines = [HEADING, "", "```sh", f"python benchmarks/repro/zloss_stability.py {args.command}", "```", ""]
    lines.append("Learning-rate sweep of the no-z-loss arm (unstable runs of "
                 f"{args.sweep_seeds}): " + ", ".join(f"lr {lr}: {n}" for lr, n in result["sweep"].items()) + ".")
    if "edge" in stats:
        e = stats["edge"]
        lines += ["", f"**Edge of stability, lr {e['lr']}** ({args.seeds} seeds per arm; unstable: the training loss "
                  f"rose more than {args.spike} nats above its running minimum, or was not finite):", "",
                  "| arm | unstable runs | Fisher p against none | verdict (paper: fewer) |", "|---|---|---|---|",
                  f"| none | {e['unstable']['none']}/{args.seeds} | - | - |"]
        for arm in ("zloss", "clip"):
            t = e["tests"][arm]
            lines.append(f"| {arm} | {t['unstable']}/{args.seeds} | {t['p']:.3f} | {t['verdict']} |")
    if "quality" in stats:
        q = stats["quality"]
        lines += ["", f"**Quality at the stable rate, lr {q['lr']}** (validation loss on the whole held-out split "
                  "after the last step; mean and 95 % interval over seeds, differences paired by seed):", "",
                  "| arm | validation loss | minus none | paper | verdict |", "|---|---|---|---|---|"]
        for arm in ARMS:
            m, h = q["means"][arm]
            if arm == "none":
                lines.append(f"| none | {m:.4f} ± {h:.4f} | - | - | - |")
            else:
                d = q["diffs"][arm]
                lines.append(f"| {arm} | {m:.4f} ± {h:.4f} | {d['mean']:+.4f} ± {d['half']:.4f} | {d['paper']} | "
                             f"{d['verdict']} |")
    lines += ["", "![training loss of every run at the edge and at the stable rate](loss.png)"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    stats = analyse(result, args)
    rows = [{"phase": phase, "lr": result[phase]["lr"], "arm": key.split("/")[0], "seed": key.split("/")[1],
             "spikes": r["spikes"], "skipped_steps": r["skipped_steps"],
             "max_router_logit": f"{r['max_router_logit']:.3f}", "final_val_loss": r["final_val_loss"]}
            for phase in ("edge", "quality") for key, r in result.get(phase, {}).get("runs", {}).items()]
    write_outputs(out, result, stats, render(result, stats, args), rows)
    plot(result, out / "loss.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in ("edge", "quality") if p in result]
    if not phases:
        return
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4), squeeze=False)
    colours = {"none": "tab:red", "zloss": "tab:blue", "clip": "tab:green"}
    for ax, phase in zip(axes[0], phases, strict=True):
        for key, losses in result[phase]["losses"].items():
            arm = key.split("/")[0]
            ax.plot(range(1, len(losses) + 1), losses, color=colours[arm], alpha=0.5, lw=0.8,
                    label=arm if key.endswith("/0") else None)
        unigram = next((r.get("unigram_val_loss") for r in result[phase]["runs"].values()
                        if r.get("unigram_val_loss")), None)
        if unigram is not None:
            ax.axhline(unigram, color="black", ls="--", lw=1, label="unigram (validation)")
        ax.set_title(f"{phase}: lr {result[phase]['lr']}")
        ax.set_xlabel("training step")
        ax.set_ylabel("training cross-entropy (nats / token, log scale)")
        ax.set_yscale("log")  # a divergence stays in view with the rest
        ax.legend(title="arm (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "runs/zloss-stability", seeds=8, steps=300)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0])
    p.add_argument("--sweep-seeds", type=int, default=2)
    p.add_argument("--spike", type=float, default=0.5, help="nats above the running minimum that make a spike")
    return study_main(p, argv, HEADING, study, write)


if __name__ == "__main__":
    sys.exit(main())
