"""Loss-free balancing against the Switch balance loss, with softmax and sigmoid router scores (issue 14).

Six arms of switch-tiny's size and data (configs/repro/lfb-*.toml: top-2 of 8 experts at capacity factor 1.25,
300 steps), three seeds each, trained by ``moekit compare`` (one output directory per score function):

    moekit compare configs/repro/lfb-softmax-{aux,bias,both}.toml --seeds 3 --out OUT/softmax
    moekit compare configs/repro/lfb-sigmoid-{aux,bias,both}.toml --seeds 3 --out OUT/sigmoid
    python benchmarks/loss_free_balancing.py OUT --results docs/results/loss_free

This script reads the runs and writes ``loss_free.md`` (table), ``loss_free.json`` and ``max_violation.png``:
per arm the final validation loss, the max violation (max load / mean load, averaged over the MoE layers and over
the logged steps of the second half of training) and the drop fraction, each as a mean with a 95 % t interval over
seeds; and, paired by seed, the differences "bias - aux" and "both - aux". The loss-free balancing paper (Wang et al.
2024) reports lower max violation and equal or better loss: a difference is "reproduced" when its interval excludes
zero on the paper's side, "contradicted" when it excludes zero on the other side, otherwise "not resolved at this
scale".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from moekit.training.metrics import max_violation, read_metrics

ARMS = ("aux", "bias", "both")
SCORES = ("softmax", "sigmoid")
# Two-sided 95 % Student t quantiles by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def run_figures(run_dir: Path) -> dict:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and r.get("tokens_per_expert")]
    for r in records:
        # The router's loads before capacity where the run logged them; kept loads otherwise (capped at C).
        r["loads"] = r.get("routed_per_expert") or r["tokens_per_expert"]
    last = records[-1]["step"]
    late = [r for r in records if r["step"] > last / 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "final_val_loss": float(summary["final_val_loss"]),
        "max_violation": statistics.fmean(
            statistics.fmean(max_violation(row) for row in r["loads"]) for r in late
        ),
        "drop_fraction": statistics.fmean(float(r["drop_fraction"]) for r in late),
        "curve": [(r["step"], statistics.fmean(max_violation(row) for row in r["loads"]))
                  for r in records],
    }


def verdict(mean: float, half: float, paper_sign: int) -> str:
    """paper_sign -1: the paper says the difference is negative (lower is the paper's side)."""
    lo, hi = mean - half, mean + half
    if (hi < 0 and paper_sign < 0) or (lo > 0 and paper_sign > 0):
        return "reproduced"
    if (lo > 0 and paper_sign < 0) or (hi < 0 and paper_sign > 0):
        return "contradicted"
    return "not resolved at this scale"


def analyse(out: Path) -> dict:
    result: dict = {"arms": {}, "paired": {}}
    for score in SCORES:
        for arm in ARMS:
            name = f"lfb-{score}-{arm}"
            seeds = sorted((out / score / name).glob("seed*"))
            if not seeds:
                raise SystemExit(f"no runs under {out / score / name}")
            result["arms"][name] = [run_figures(s) for s in seeds]
        aux = result["arms"][f"lfb-{score}-aux"]
        for arm in ("bias", "both"):
            other = result["arms"][f"lfb-{score}-{arm}"]
            n = min(len(aux), len(other))
            paired = {}
            for key, paper_sign in (("final_val_loss", -1), ("max_violation", -1), ("drop_fraction", -1)):
                diffs = [other[i][key] - aux[i][key] for i in range(n)]
                m, h = interval(diffs)
                paired[key] = {"mean": m, "half_width": h, "n": n, "verdict": verdict(m, h, paper_sign)}
            result["paired"][f"{score}: {arm} - aux"] = paired
    return result


def render(result: dict, command: str) -> str:
    lines = [
        "# Loss-free balancing against the balance loss (softmax and sigmoid scores)",
        "",
        f"Command: `{command}`. Means over seeds with 95 % t intervals; max violation = max load / mean load "
        "(1 = balanced), averaged over the MoE layers and the logged steps of the second half of training; drops "
        "likewise.",
        "",
        "| arm | seeds | final val loss | max violation | drop fraction |",
        "|---|---|---|---|---|",
    ]
    for name, runs in result["arms"].items():
        cells = []
        for key, fmt in (("final_val_loss", ".4f"), ("max_violation", ".3f"), ("drop_fraction", ".4f")):
            m, h = interval([r[key] for r in runs])
            cells.append(f"{m:{fmt}} ± {h:{fmt}}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed (the paper's side is negative for all three):", "",
              "| difference | final val loss | max violation | drop fraction |", "|---|---|---|---|"]
    for name, p in result["paired"].items():
        cells = [f"{p[k]['mean']:+.4f} ± {p[k]['half_width']:.4f} ({p[k]['verdict']})"
                 for k in ("final_val_loss", "max_violation", "drop_fraction")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, score in zip(axes, SCORES, strict=True):
        for arm, style in zip(ARMS, ("-", "--", ":"), strict=True):
            runs = result["arms"][f"lfb-{score}-{arm}"]
            steps = [s for s, _ in runs[0]["curve"]]
            mean = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, style, label=arm)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{score} scores")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("max load / mean load (mean over layers and seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the directory holding softmax/ and sigmoid/ compare outputs")
    p.add_argument("--results", default="docs/results/loss_free", help="where the table, JSON and plot go")
    args = p.parse_args(argv)
    result = analyse(Path(args.out))
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/loss_free_balancing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (res / "loss_free.md").write_text(render(result, command))
    slim = {"arms": {k: [{kk: vv for kk, vv in r.items() if kk != "curve"} for r in v]
                     for k, v in result["arms"].items()}, "paired": result["paired"]}
    (res / "loss_free.json").write_text(json.dumps(slim, indent=1))
    plot(result, res / "max_violation.png")
    print(render(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
