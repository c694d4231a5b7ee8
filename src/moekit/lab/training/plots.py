"""PNG plots of a run from its ``metrics.jsonl``: the losses, per-layer expert load over time, and load imbalance.

Each figure is built by a ``*_figure`` function that returns the ``matplotlib.figure.Figure`` (tests read its axes,
labels and lines) and saved by :func:`plot_run`. Every axis is labelled with its unit, and MoE layers are named by
their block, as the routing report names them ("block 3", "encoder block 1"; :func:`moe_layer_names`).

Expert load is drawn by what it must show: up to :data:`STACK_AT_MOST` experts as stacked shares in distinct
colours, the dropped share as its own hatched band (only when the layer dropped anything); more experts as a heatmap
of load / balanced load per expert and step (a diverging colour map centred on 1 = balanced: no colour repeats).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``, whose ``savefig`` renders with Agg):
no pyplot, no backend switch, no global state, so this works with no display and leaves a notebook's backend alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.atomic import atomic_path
from moekit.training.metrics import max_violation, read_metrics

__all__ = [
    "STACK_AT_MOST", "expert_load_figure", "load_balance_figure", "loss_figure", "moe_layer_names",
    "plot_load_balance", "plot_run",
]

# Up to this many experts the load is a stacked area in distinct colours (tab10 has 10); beyond, a heatmap.
STACK_AT_MOST = 10


def _float(v: object) -> float:
    try:
        return float(v)  # "nan" / "inf" strings written for non-finite values
    except (TypeError, ValueError):
        return float("nan")


def _save(fig: Any, path: Path) -> None:
    """Save ``fig`` as PNG under a temporary name and rename it onto ``path``: a full disk leaves no truncated
    image, and is one line naming it (:mod:`moekit.atomic`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")  # the temporary name has no .png suffix to infer it from


def moe_layer_names(run_dir: str | Path, count: int) -> list[str]:
    """The names of a run's ``count`` MoE layers, in the order of its metrics: "block B" (B the 0-based block
    index, as ``moekit analyze`` names them), "encoder block B" / "decoder block B" for an encoder-decoder. Falls back
    to "MoE layer i" when the run's config cannot be read or does not match ``count``."""
    names: list[str] = []
    try:
        from moekit.lab.training.run import read_run_config
        from moekit.models import LMConfig, Seq2SeqConfig, ViTConfig

        model = read_run_config(Path(run_dir)).model
        if isinstance(model, ViTConfig):
            names = [f"block {b}" for b in model.moe_block_indices()]
        elif isinstance(model, Seq2SeqConfig):  # encoder first, as the metrics list them
            names = [f"{stack} block {b}" for stack in ("encoder", "decoder") for b in model.moe_layers(stack)]
        elif isinstance(model, LMConfig):
            names = [f"block {b}" for b in range(model.n_layers) if model.is_moe_layer(b)]
    except Exception:  # noqa: BLE001 - a plot of an unreadable or foreign run still draws, with plain names
        names = []
    return names if len(names) == count else [f"MoE layer {i}" for i in range(count)]


def loss_figure(
    records: list[dict[str, Any]],
    *,
    title: str = "",
    per: str = "token",
    unigram_baseline: float | None = None,
    teacher_loss: float | None = None,
    objective: str | None = None,
) -> Any:
    """Training and validation cross-entropy over steps (nats per ``per``). The training objective is drawn too
    when it differs from the cross-entropy, labelled ``objective`` (default: cross-entropy + the MoE aux losses);
    ``teacher_loss``: a distillation teacher's validation cross-entropy, as a horizontal line."""
    from matplotlib.figure import Figure

    ce = [(r["step"], _float(r["ce_loss"])) for r in records if "ce_loss" in r]
    total = [(r["step"], _float(r["loss"])) for r in records if "loss" in r]
    val = [(r["step"], _float(r["val_loss"])) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    if ce:
        ax.plot(*zip(*ce, strict=True), lw=1, color="tab:blue", label="training cross-entropy (labels)")
    if total and (not ce or any(abs(t - c) > 1e-6 for (_, t), (_, c) in zip(total, ce, strict=False))):
        ax.plot(*zip(*total, strict=True), lw=1, color="tab:cyan", alpha=0.8,
                label=f"training objective: {objective or 'cross-entropy + MoE aux losses'}")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", lw=2, color="tab:orange", label="validation cross-entropy")
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="tab:red", ls=":", lw=1.5,
                   label=f"teacher validation cross-entropy {teacher_loss:.2f}")
    if unigram_baseline is not None:
        ax.axhline(unigram_baseline, color="grey", ls="--", label=f"unigram baseline {unigram_baseline:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"cross-entropy (nats per {per})")
    ax.set_title(f"{title}: loss" if title else "loss")
    # Below the axes, never over the curves.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_figure(records: list[dict[str, Any]], *, title: str = "") -> Any:
    """Held-out accuracy of an image classifier over steps."""
    from matplotlib.figure import Figure

    acc = [(r["step"], 100 * _float(r["val_accuracy"])) for r in records if "val_accuracy" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(*zip(*acc, strict=True), "o-", lw=2, color="tab:orange", label="test accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (% of test images)")
    ax.set_title(f"{title}: test accuracy" if title else "test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def expert_load_figure(records: list[dict[str, Any]], names: list[str] | None = None, *, title: str = "") -> Any:
    """Each MoE layer's load per expert over the logged steps, one panel per layer (see the module docstring for
    the two forms). ``records``: metrics lines with ``tokens_per_expert`` (and ``drop_fraction_per_layer``)."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    loads = [(r["step"], r["tokens_per_expert"], r.get("drop_fraction_per_layer")) for r in records
             if r.get("tokens_per_expert")]
    num_layers = len(loads[0][1])
    names = names or [f"MoE layer {i}" for i in range(num_layers)]
    num_experts = len(loads[0][1][0])
    stacked = num_experts <= STACK_AT_MOST
    steps = np.array([s for s, _, _ in loads])
    fig = Figure(figsize=(8.2, 2.4 * num_layers + 0.9))
    axes = fig.subplots(num_layers, 1, squeeze=False, sharex=True)
    for layer in range(num_layers):
        ax = axes[layer][0]
        kept_SE = np.array([row[layer] for _, row, _ in loads], dtype=float)  # S logged steps, E experts
        drop_S = np.array([_float(d[layer]) if d else 0.0 for _, _, d in loads])
        if stacked:
            # Shares of all routed assignments (kept + dropped), so the bands and the dropped band sum to 1.
            routed_S = kept_SE.sum(1) / np.where(drop_S < 1.0, 1.0 - drop_S, 1.0)
            share_ES = (kept_SE / np.maximum(routed_S, 1e-9)[:, None]).T
            colors = [f"C{e}" for e in range(num_experts)]
            ax.stackplot(steps, 100 * share_ES, colors=colors, labels=[f"expert {e}" for e in range(num_experts)])
            if drop_S.max() > 0:
                ax.fill_between(steps, 100 * share_ES.sum(0), 100, facecolor="white", edgecolor="grey",
                                hatch="///", lw=0, label="dropped (over capacity)")
            ax.axhline(100 / num_experts, color="black", ls=":", lw=0.8)
            ax.set_ylim(0, 100)
            ax.set_ylabel(f"{names[layer]}\n% of routed assignments", fontsize=8)
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
        else:
            # Load relative to an even split of what was kept: 1 = balanced, white; red above, blue below.
            mean_S = np.maximum(kept_SE.mean(1), 1e-9)
            rel_ES = (kept_SE / mean_S[:, None]).T
            vmax = max(2.0, float(rel_ES.max()))
            half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
            im = ax.imshow(rel_ES, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax),
                           extent=(steps[0] - half, steps[-1] + half, num_experts - 0.5, -0.5),
                           interpolation="nearest")
            ax.set_ylabel(f"{names[layer]}\nexpert", fontsize=8)
            ax.set_yticks(range(0, num_experts, max(1, num_experts // 8)))
            bar = fig.colorbar(im, ax=ax, pad=0.01)
            bar.set_label("load / balanced load", fontsize=8)
        notes = []
        if np.allclose(kept_SE, kept_SE[:, :1]):
            notes.append("every expert equally loaded at every step (balanced by construction)")
        if drop_S.max() > 0:
            notes.append(f"dropped {100 * drop_S.mean():.1f}% of assignments on average")
        ax.set_title(f"{names[layer]}" + (f": {'; '.join(notes)}" if notes else ""), fontsize=9)
    axes[-1][0].set_xlabel("optimizer step")
    what = ("share of routed assignments per expert (dotted line: an even split)" if stacked
            else "tokens per expert relative to an even split")
    fig.suptitle(f"{title}: {what}" if title else what, fontsize=10)
    fig.tight_layout()
    return fig


def load_balance_figure(records: list[dict[str, Any]], names: list[str] | None = None, *, title: str = "") -> Any:
    """Per MoE layer over training: max load / mean load ("max violation", 1 = balanced) and, when loss-free
    balancing is on, the range of the router's expert bias."""
    from matplotlib.figure import Figure

    records = [r for r in records if "event" not in r and r.get("tokens_per_expert")]
    steps = [r["step"] for r in records]
    # The router's loads before capacity where logged (kept loads cannot exceed the capacity C); recomputed here so
    # that runs logged before these fields existed plot too.
    violation = [[max_violation(row) for row in r.get("routed_per_expert") or r["tokens_per_expert"]]
                 for r in records]
    names = names or [f"MoE layer {i}" for i in range(len(violation[0]))]
    has_bias = all("expert_bias_range_per_layer" in r for r in records)
    fig = Figure(figsize=(7, 6 if has_bias else 3.6))
    axes = fig.subplots(2 if has_bias else 1, 1, squeeze=False)
    ax = axes[0][0]
    for layer in range(len(violation[0])):
        ax.plot(steps, [v[layer] for v in violation], lw=1, label=names[layer])
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("busiest expert's load / mean load")
    ax.set_title(f"{title}: expert load imbalance (1 = balanced)" if title else "expert load imbalance (1 = balanced)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if has_bias:
        ax = axes[1][0]
        for layer in range(len(records[0]["expert_bias_range_per_layer"])):
            ax.plot(steps, [r["expert_bias_range_per_layer"][layer] for r in records], lw=1, label=names[layer])
        ax.set_ylabel("expert bias max - min\n(router score units)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def plot_run(
    run_dir: str | Path,
    unigram_baseline: float | None = None,
    *,
    teacher_loss: float | None = None,
    objective: str | None = None,
) -> list[Path]:
    """Write ``plots/loss.png``, (for classifiers) ``plots/accuracy.png`` and (for MoE runs)
    ``plots/expert_load.png`` and ``plots/load_balance.png``; returns the files written. ``teacher_loss`` and
    ``objective``: see :func:`loss_figure` (a distillation run)."""
    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        _save(fig, path)
        written.append(path)

    classifier = any("val_accuracy" in r for r in records)
    save(loss_figure(records, title=run_dir.name, per="image" if classifier else "token",
                     unigram_baseline=unigram_baseline, teacher_loss=teacher_loss, objective=objective), "loss.png")
    if classifier:
        save(accuracy_figure(records, title=run_dir.name), "accuracy.png")
    moe = [r for r in records if r.get("tokens_per_expert")]
    if moe:
        names = moe_layer_names(run_dir, len(moe[0]["tokens_per_expert"]))
        save(expert_load_figure(moe, names, title=run_dir.name), "expert_load.png")
        save(load_balance_figure(moe, names, title=run_dir.name), "load_balance.png")
    return written


def plot_load_balance(metrics_path: str | Path, path: str | Path, *, title: str = "",
                      names: list[str] | None = None) -> Path | None:
    """:func:`load_balance_figure` of a ``metrics.jsonl`` saved to ``path``; None (nothing written) for a run
    without MoE loads."""
    records = [r for r in read_metrics(Path(metrics_path)) if "event" not in r and r.get("tokens_per_expert")]
    if not records:
        return None
    path = Path(path)
    names = names or moe_layer_names(Path(metrics_path).parent, len(records[0]["tokens_per_expert"]))
    _save(load_balance_figure(records, names, title=title), path)
    return path
