"""Soft MoE vs token choice vs expert choice vs dense in a small ViT on Fashion-MNIST, at equal FFN FLOPs per
image (the Soft MoE paper's comparison, Puigcerver et al. 2023, at toy scale).

Trains every configs/vit-*.toml arm for ``--seeds`` seeds through ``moekit compare`` (resumable: rerun with the
same ``--out`` to go on), then writes, beside compare's own table and loss plot:

    accuracy.png   test accuracy vs training step and vs training seconds (mean over seeds, min-max band)
    accuracy.md    one row per arm: accuracy mean / std / min / max, loss, dropped tokens, parameters, FLOPs
    step_time.md   (``--time-rounds R``) each arm's training-step time measured side by side in this process:
                   interleaved rounds, medians and the ratio to dense (the runs' own clocks are only as quiet as the
                   machine was while they ran)

and copies the small result files into ``--results`` (docs/results/vit by default) for docs/RESULTS.md.

    python benchmarks/vit_fashion_mnist.py --seeds 3 --set train.threads=1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARMS = [
    "vit-dense",
    "vit-top1",
    "vit-top1-cf125",
    "vit-top2",
    "vit-top2-cf125",
    "vit-ec",
    "vit-softmoe",
    "vit-softmoe-2slots",
]
LABELS = {
    "vit-dense": "dense",
    "vit-top1": "top-1, CF 1.0, BPR",
    "vit-top1-cf125": "top-1, CF 1.25, BPR",
    "vit-top2": "top-2, CF 1.0, BPR",
    "vit-top2-cf125": "top-2, CF 1.25, BPR",
    "vit-ec": "expert choice, c = 1",
    "vit-softmoe": "Soft MoE, 16 x 1 slot",
    "vit-softmoe-2slots": "Soft MoE, 8 x 2 slots",
}


def _curves(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) of ``val_accuracy`` over the seeds against ``key`` ("step" or "time_s"): the runs
    evaluate at the same steps, so points are aligned by index; time is averaged across seeds."""
    n = min(len(r["curve"]["val_accuracy"]) for r in runs)
    acc = np.array([r["curve"]["val_accuracy"][:n] for r in runs])
    x = np.array([r["curve"][key][:n] for r in runs]).mean(axis=0)
    return x, acc.mean(axis=0), acc.min(axis=0), acc.max(axis=0)


def plot_accuracy(result: dict, path: Path, step_seconds: dict[str, float] | None = None) -> None:
    """Accuracy vs step and vs training seconds. With ``step_seconds`` (each arm's side-by-side median step time)
    the time axis is step x that time, so every arm is timed under the same conditions; otherwise it is each run's
    own clock, which also records how busy the machine was while that run trained."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for name, runs in result["runs"].items():
        runs = [r for r in runs if r["curve"]["val_accuracy"]]
        if not runs:
            continue
        style = "-" if "soft" in name else ("--" if name == "vit-dense" else ":")
        for ax, key in zip(axes, ("step", "time_s"), strict=True):
            if key == "time_s" and step_seconds is not None:
                x, mean, lo, hi = _curves(runs, "step")
                x = x * step_seconds[name]
            else:
                x, mean, lo, hi = _curves(runs, key)
            (line,) = ax.plot(x, mean, style, marker="o", ms=3, label=LABELS.get(name, name))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("training step (batch 128)")
    axes[1].set_xlabel(
        "training seconds: step x side-by-side median step time (1 thread)"
        if step_seconds is not None
        else "training seconds (each run's clock, 1 CPU thread; evaluation excluded)"
    )
    axes[0].set_ylabel("Fashion-MNIST test accuracy")
    lows = [min(r["curve"]["val_accuracy"][-1] for r in runs) for runs in result["runs"].values()]
    axes[0].set_ylim(max(0.0, min(lows) - 0.08), None)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("ViT on Fashion-MNIST at equal FFN FLOPs per image (mean of seeds, band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def accuracy_table(result: dict) -> str:
    # Training seconds are left out here: each run's clock records how busy the machine was while it ran; the
    # side-by-side step times (step_time.md) compare the arms' speed.
    head = (
        "| arm | test accuracy mean | std | min | max | test loss | dropped tokens | "
        "parameters (total / active per token) | train GFLOP per image |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, runs in result["runs"].items():
        acc = np.array([r["final_val_accuracy"] for r in runs if r.get("final_val_accuracy") is not None])
        loss = np.array([r["final_val_loss"] for r in runs if r.get("final_val_loss") is not None])
        drops = [r["curve"]["drop_fraction"] for r in runs if r["curve"]["drop_fraction"] is not None]
        first = runs[0]
        drop_text = f"{100 * np.mean(drops):.1f}%" if drops else "0 (none dropped)"
        lines.append(
            f"| {LABELS.get(name, name)} | {acc.mean():.4f} | {acc.std(ddof=1) if len(acc) > 1 else 0:.4f} | "
            f"{acc.min():.4f} | {acc.max():.4f} | {loss.mean():.4f} | {drop_text} | "
            f"{first['parameters_total']:,} / {first['parameters_active']:,} | "
            f"{first.get('train_flops_per_image', 0) / 1e9:.4f} |"
        )
    return "\n".join(lines) + "\n"


def time_arms(arms: list[str], overrides: list[str], rounds: int, steps: int = 10) -> tuple[str, dict[str, float]]:
    """Median seconds per training step (forward, backward, AdamW) of every arm, on one fixed batch of the
    configured size, the arms interleaved round by round so a busy spell hits them all alike. Returns a Markdown
    table and the medians by arm."""
    import time

    import torch

    from moekit.lab.training.run_config import load_run_config
    from moekit.models.vit import ViT

    models, opts, batches = {}, {}, {}
    for name in arms:
        cfg = load_run_config(str(ROOT / "configs" / f"{name}.toml"), overrides)
        vit = cfg.model
        torch.manual_seed(0)
        models[name] = ViT(vit)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        shape = (cfg.train.batch_size, vit.in_channels, vit.image_size, vit.image_size)
        batches[name] = (torch.randn(shape, generator=g), torch.randint(0, vit.num_classes, (shape[0],), generator=g))

    def step(name: str) -> None:
        out = models[name](*batches[name])
        out.loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in arms:  # warm-up
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name in arms:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            times[name].append((time.perf_counter() - t0) / steps)
    dense = float(np.median(times[arms[0]]))
    lines = [
        f"| arm | ms per step (median of {rounds} rounds x {steps} steps) | / {LABELS.get(arms[0], arms[0])} |",
        "|---|---|---|",
    ]
    for name in arms:
        med = float(np.median(times[name]))
        lines.append(f"| {LABELS.get(name, name)} | {1e3 * med:.1f} | {med / dense:.2f} |")
    return "\n".join(lines) + "\n", {name: float(np.median(times[name])) for name in arms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/vit-fashion-mnist", help="compare's output directory (resumable)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--arms", nargs="*", default=ARMS, help="config names from configs/")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results" / "vit"))
    parser.add_argument(
        "--time-rounds", type=int, default=0, help="also time every arm's training step side by side (R rounds)"
    )
    args = parser.parse_args(argv)

    from moekit.lab.runtime import train_run_with_threads
    from moekit.lab.training.compare import compare

    sources = [str(ROOT / "configs" / f"{name}.toml") for name in args.arms]
    res = compare(sources, seeds=args.seeds, overrides=args.overrides, out_dir=args.out, baseline="vit-dense",
                  train=train_run_with_threads)  # as moekit compare: each run's train.threads applies
    out = Path(args.out)
    result = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    names = ["accuracy.png", "accuracy.md", "compare.md", "compare.csv", "val_loss.png"]
    step_seconds = None
    if args.time_rounds > 0:
        import torch

        torch.set_num_threads(1)  # as the runs (train.threads = 1)
        table, step_seconds = time_arms(args.arms, args.overrides, args.time_rounds)
        (out / "step_time.md").write_text(table, encoding="utf-8")
        names.append("step_time.md")
        print(table)
    plot_accuracy(result, out / "accuracy.png", step_seconds)
    (out / "accuracy.md").write_text(accuracy_table(result), encoding="utf-8")
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(out / name, dest / name)
    print((out / "accuracy.md").read_text(encoding="utf-8"))
    print(f"trained {len(res.trained)} runs, skipped {len(res.skipped)}; results in {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
