"""PNG figures of a routing analysis, returned as bytes so the HTML report can embed them (base64 data URIs: the
report is one self-contained file that opens offline).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``, whose ``savefig`` renders with Agg):
no pyplot, no backend switch, no global state, so this works with no display and leaves a notebook's backend alone.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["load_figure", "load_figure_object", "specialisation_figure", "agreement_figure", "layer_label"]


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _p(p: float) -> str:
    return "<1e-300" if p <= 0 else f"={p:.1g}"


def layer_label(layer: dict[str, Any]) -> str:
    """How plots and the report name a layer: its ``name`` ("encoder block 1") when set, else "block B"."""
    return layer.get("name", f"block {layer['block']}")


def load_figure(summary: dict[str, Any]) -> bytes:
    """:func:`load_figure_object` as PNG bytes."""
    return _png(load_figure_object(summary))


def load_figure_object(summary: dict[str, Any]) -> Any:
    """Per MoE layer: each expert's share of routed assignments (kept, and dropped stacked on top when the layer
    dropped any), then router entropy and dropped share per layer. Returns the matplotlib Figure."""
    layers = summary["layers"]
    E = summary["num_experts"]
    fig = _figure((4 * (len(layers) + 1), 3.4))
    axes = fig.subplots(1, len(layers) + 1, squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=False):
        load = layer["load"]
        total = max(sum(load["chosen_per_expert"]), 1)
        kept = 100 * np.array(load["kept_per_expert"]) / total
        dropped = 100 * (np.array(load["chosen_per_expert"]) - np.array(load["kept_per_expert"])) / total
        x = np.arange(E)
        ax.bar(x, kept, label="kept")
        if dropped.sum() > 0:  # only what applies: expert choice and Soft MoE drop nothing
            ax.bar(x, dropped, bottom=kept, color="tab:red", label="dropped (over capacity)")
        ax.axhline(100 / E, color="grey", ls="--", lw=1, label="even split")
        ticks = range(0, E, max(1, E // 16))
        ax.set_xticks(list(ticks), [f"e{e}" for e in ticks], fontsize=8 if E > 8 else 10)
        ax.set_xlabel("expert")
        dropped_text = f" (dropped {load['dropped_share']:.1%})" if dropped.sum() > 0 else ""
        ax.set_title(f"{layer_label(layer)}: load{dropped_text}", fontsize=9)
        ax.set_ylabel("% of routed assignments")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    x = np.arange(len(layers))
    ax.bar(x - 0.2, [la["load"]["entropy_normalised"] for la in layers], 0.4,
           label="router entropy / log E (1 = uniform)")
    ax.bar(x + 0.2, [la["load"]["dropped_share"] for la in layers], 0.4, color="tab:red",
           label="share of assignments dropped")
    ax.set_xticks(x, [layer_label(la) for la in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("fraction (0 to 1)")
    ax.set_ylim(0, 1.15)
    ax.set_title("router entropy and drops per layer", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def specialisation_figure(summary: dict[str, Any], layer_index: int) -> bytes:
    """Heatmap of log2(expert share / corpus share) per expert and category for one layer, with the counts."""
    layer = summary["layers"][layer_index]
    names = summary["categories"]
    enr = np.array([[np.nan if v is None else v for v in ex["enrichment"]] for ex in layer["experts"]], dtype=float)
    with np.errstate(divide="ignore"):
        log_enr = np.log2(np.where(enr > 0, enr, np.nan))
    fig = _figure((1.0 * len(names) + 2.5, 0.42 * len(layer["experts"]) + 1.6))
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(log_enr, nan=-3.0).clip(-3, 3), cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
    for e, ex in enumerate(layer["experts"]):
        for c, n in enumerate(ex["category_counts"]):
            # White on the dark ends of the colour map, black in the middle.
            dark = not np.isfinite(log_enr[e, c]) or abs(log_enr[e, c]) > 1.8
            ax.text(c, e, str(n), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layer["experts"])),
                  [f"e{ex['expert']} (p{_p(ex['p_value'])})" for ex in layer["experts"]], fontsize=8)
    ax.set_title(f"{layer_label(layer)}: log2(expert share / corpus share); numbers are counts", fontsize=9)
    ax.set_xlabel("token category")
    ax.set_ylabel("expert (p: chi-squared test)", fontsize=8)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label("log2(expert share / corpus share)", fontsize=8)
    return _png(fig)


def agreement_figure(summary: dict[str, Any], index: int) -> bytes:
    """Row-normalised transition matrix of the top-1 expert between two consecutive MoE layers."""
    a = summary["agreement"][index]
    M = np.array(a["transition_share"])
    E = M.shape[0]
    fig = _figure((4.6, 4))
    ax = fig.subplots()
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(E), [f"e{e}" for e in range(E)], fontsize=8)
    ax.set_yticks(range(E), [f"e{e}" for e in range(E)], fontsize=8)
    to_name = a.get("to_name", f"block {a['to_block']}")
    from_name = a.get("from_name", f"block {a['from_block']}")
    ax.set_xlabel(f"expert in {to_name}")
    ax.set_ylabel(f"expert in {from_name}")
    ax.set_title(f"P(next expert | expert); MI {a['mutual_information_bits']:.3f} bits", fontsize=9)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label("probability", fontsize=8)
    return _png(fig)
