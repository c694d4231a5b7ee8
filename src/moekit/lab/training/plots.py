"""PNG plots of a run from its ``metrics.jsonl``: train / validation loss, and per-layer expert load over
time.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``, whose ``savefig`` renders with Agg):
no pyplot, no backend switch, no global state, so this works with no display and leaves a notebook's backend alone.
"""

from __future__ import annotations

from pathlib import Path

from moekit.atomic import atomic_path
from moekit.training.metrics import max_violation, read_metrics

__all__ = ["plot_load_balance", "plot_run"]


def _float(v: object) -> float:
    try:
        return float(v)  # "nan" / "inf" strings written for non-finite values
    except (TypeError, ValueError):
        return float("nan")


def _save(fig, path: Path) -> None:  # noqa: ANN001 - a matplotlib Figure
    """Save ``fig`` as PNG under a temporary name and rename it onto ``path``: a full disk leaves no truncated
    image, and is one line naming it (:mod:`moekit.atomic`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")  # the temporary name has no .png suffix to infer it from


def plot_run(run_dir: str | Path, unigram_baseline: float | None = None) -> list[Path]:
    """Write ``plots/loss.png``, (for classifiers) ``plots/accuracy.png`` and (for MoE runs)
    ``plots/expert_load.png`` and ``plots/load_balance.png``; returns the files written."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    train = [(r["step"], _float(r["loss"])) for r in records if "loss" in r]
    val = [(r["step"], _float(r["val_loss"])) for r in records if "val_loss" in r]
    acc = [(r["step"], _float(r["val_accuracy"])) for r in records if "val_accuracy" in r]
    def step_plot(name: str, ylabel: str, draw) -> None:  # noqa: ANN001 - draw(ax) adds the lines
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        draw(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(run_dir.name)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / name
        _save(fig, path)
        written.append(path)

    def draw_loss(ax) -> None:  # noqa: ANN001
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss (total)", lw=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation cross-entropy", lw=2)
        if unigram_baseline is not None:
            ax.axhline(unigram_baseline, color="grey", ls="--", label=f"unigram baseline {unigram_baseline:.2f}")

    step_plot("loss.png", "nats / image" if acc else "nats / token", draw_loss)
    if acc:  # an image classifier
        step_plot("accuracy.png", "accuracy", lambda ax: ax.plot(*zip(*acc, strict=True), "o-", lw=2,
                                                                  label="test accuracy"))

    loads = [
        (r["step"], r["tokens_per_expert"], r.get("drop_fraction_per_layer"))
        for r in records
        if r.get("tokens_per_expert")
    ]
    if loads:
        num_layers = len(loads[0][1])
        fig = Figure(figsize=(7, 2.2 * num_layers + 0.6))
        axes = fig.subplots(num_layers, 1, squeeze=False)
        steps = [s for s, _, _ in loads]
        for layer in range(num_layers):
            ax = axes[layer][0]
            counts = [row[layer] for _, row, _ in loads]
            # Shares of all routed assignments (kept + dropped): the white gap on top is the dropped share.
            totals = []
            for (_, _, drops), c in zip(loads, counts, strict=True):
                drop = _float(drops[layer]) if drops else 0.0
                totals.append(sum(c) / (1.0 - drop) if drop < 1.0 else max(1, sum(c)))
            num_experts = len(counts[0])
            fractions = [[c[e] / max(1e-9, t) for c, t in zip(counts, totals, strict=True)] for e in range(num_experts)]
            ax.stackplot(steps, fractions, labels=[f"expert {e}" for e in range(num_experts)])
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"MoE layer {layer}\nshare")
            if layer == 0:
                ax.set_title("share of routed assignments per expert (white on top: dropped)")
                ax.legend(loc="upper right", fontsize=6, ncol=4)
        axes[-1][0].set_xlabel("step")
        fig.tight_layout()
        path = out_dir / "expert_load.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    balance = plot_load_balance(run_dir / "metrics.jsonl", out_dir / "load_balance.png", title=run_dir.name)
    if balance is not None:
        written.append(balance)
    return written


def plot_load_balance(metrics_path: str | Path, path: str | Path, *, title: str = "") -> Path | None:
    """Per MoE layer over training: max load / mean load ("max violation", 1 = balanced) and, when loss-free
    balancing is on, the range of the router's expert bias. None (nothing written) for a run without MoE loads."""
    from matplotlib.figure import Figure

    records = [r for r in read_metrics(Path(metrics_path)) if "event" not in r and r.get("tokens_per_expert")]
    if not records:
        return None
    steps = [r["step"] for r in records]
    # The router's loads before capacity where logged (kept loads cannot exceed the capacity C); recomputed here so
    # that runs logged before these fields existed plot too.
    violation = [[max_violation(row) for row in r.get("routed_per_expert") or r["tokens_per_expert"]]
                 for r in records]
    has_bias = all("expert_bias_range_per_layer" in r for r in records)
    fig = Figure(figsize=(7, 6 if has_bias else 3.6))
    axes = fig.subplots(2 if has_bias else 1, 1, squeeze=False)
    ax = axes[0][0]
    for layer in range(len(violation[0])):
        ax.plot(steps, [v[layer] for v in violation], lw=1, label=f"MoE layer {layer}")
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("max load / mean load")
    ax.set_title(f"{title}: expert load imbalance per layer (1 = balanced)" if title else "expert load imbalance")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if has_bias:
        ax = axes[1][0]
        for layer in range(len(records[0]["expert_bias_range_per_layer"])):
            ax.plot(steps, [r["expert_bias_range_per_layer"][layer] for r in records], lw=1, label=f"MoE layer {layer}")
        ax.set_ylabel("expert bias max - min")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path
