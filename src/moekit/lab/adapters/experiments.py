"""The MoV / MoLoRA comparison grid behind docs/RESULTS.md: run it (resumable), tabulate it, plot the routing.

Each run writes ``<out>/<name>/results.json`` when it finishes; the grid skips runs whose results exist, so an
interrupted grid resumes where it stopped and nothing finished is lost.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from moekit.lab.adapters.finetune import FinetuneConfig, run_finetune

# (name, overrides). Order: cheapest and most informative first, so a cut-short grid still answers the main
# question (MoV vs (IA)3 vs LoRA vs full fine-tuning).
GRID: list[tuple[str, dict[str, Any]]] = [
    ("frozen", {"method": "frozen"}),
    ("ia3", {"method": "ia3"}),
    ("mov10", {"method": "mov", "num_experts": 10}),
    ("lora", {"method": "lora"}),
    ("full", {"method": "full"}),
    ("mov2", {"method": "mov", "num_experts": 2}),
    ("mov5", {"method": "mov", "num_experts": 5}),
    ("mov30", {"method": "mov", "num_experts": 30}),
    ("molora10", {"method": "molora", "num_experts": 10}),
    ("mov10_top1", {"method": "mov", "num_experts": 10, "routing": "topk", "top_k": 1}),
    ("mov10_top2", {"method": "mov", "num_experts": 10, "routing": "topk", "top_k": 2}),
    ("mov10_sentence", {"method": "mov", "num_experts": 10, "router_input": "sentence"}),
]


def run_grid(out_dir: str | Path, base: dict[str, Any],
             only: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs every grid entry (or those named in ``only``) that has no ``results.json`` yet, one at a time."""
    out = Path(out_dir)
    results = []
    for name, overrides in GRID:
        if only and name not in only:
            continue
        path = out / name / "results.json"
        if path.is_file():
            print(f"[grid] {name}: done already ({path})", file=sys.stderr)
            results.append(json.loads(path.read_text()))
            continue
        t0 = time.time()
        print(f"[grid] {name}: running", file=sys.stderr, flush=True)
        cfg = {**base, **overrides, "name": name}
        cfg["probe"] = cfg.get("probe", False) and cfg.get("method") == "frozen"  # the probe is the frozen run's
        res = run_finetune(FinetuneConfig(**cfg), out / name)
        print(f"[grid] {name}: seen {res['seen_mean']:.3f} held-out {res['heldout_mean']:.3f} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        results.append(res)
    return results


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    order = {name: i for i, (name, _) in enumerate(GRID)}
    found = [json.loads(p.read_text()) for p in Path(out_dir).glob("*/results.json")]
    return sorted(found, key=lambda r: (order.get(r["name"], len(order)), r["name"]))


def _describe(r: dict[str, Any]) -> str:
    c = r["config"]
    m = c["method"]
    if m == "mov":
        routing = "soft" if c["routing"] == "soft" else f"top-{c['top_k']}"
        return f"MoV, {c['num_experts']} experts, {routing}, {c['router_input']} router"
    if m == "molora":
        return f"MoLoRA, {c['num_experts']} experts, r={c['r']}, {c['routing']}"
    return {"frozen": "frozen encoder (zero-shot, no training)", "ia3": "(IA)3", "lora": f"LoRA r={c['r']}",
            "full": "full fine-tuning"}[m]


def majority_baseline(result: dict[str, Any]) -> dict[str, float]:
    """Accuracy of always giving each test split's most frequent gold answer (a reference, not a method)."""
    from collections import Counter

    from moekit.lab.adapters.tasks import build_tasks

    c = result["config"]
    _, test = build_tasks(c["n_train"], c["n_test"], c["seed"], tuple(c["seen_tasks"]),
                          tuple(c["heldout_tasks"]))
    out = {}
    for name, examples in test.items():
        counts = Counter(e.candidates[e.label] for e in examples)
        out[name] = counts.most_common(1)[0][1] / max(len(examples), 1)
    return out


def results_table(results: list[dict[str, Any]], majority: dict[str, float] | None = None) -> str:
    """A Markdown table: trainable fraction, seen/held-out means and accuracy per task."""
    if not results:
        return "(no results)"
    seen = results[0]["config"]["seen_tasks"]
    held = results[0]["config"]["heldout_tasks"]
    head = (["run", "method", "trainable", "% of base", "seen mean", "held-out mean"] + seen + held
            + ["train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if majority:
        s_mean = sum(majority[t] for t in seen) / len(seen)
        h_mean = sum(majority[t] for t in held) / len(held)
        row = ["majority", "most frequent answer of each test split (reference)", "-", "-", f"{s_mean:.3f}",
               f"{h_mean:.3f}"] + [f"{majority[t]:.3f}" for t in seen + held] + ["-"]
        lines.append("| " + " | ".join(row) + " |")
    for r in results:
        acc = r["accuracy"]
        row = [r["name"], _describe(r), f"{r['trainable_params']:,}", f"{100 * r['trainable_fraction']:.3f}",
               f"**{r['seen_mean']:.3f}**", f"**{r['heldout_mean']:.3f}**"]
        row += [f"{acc.get(t, float('nan')):.3f}" for t in seen + held] + [f"{r['train_time_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _site_title(site: str) -> str:
    """A Hugging Face site name as the plots name layers: "encoder.layer.3.output.dense" -> "block 3: output.dense"
    (0-based, as ``moekit analyze`` names blocks)."""
    m = re.match(r"^(?:.*\.)?(?:layer|layers|block|h)\.(\d+)\.(.*)$", site)
    if m is None:
        return site
    return f"block {m[1]}: {m[2].replace('attention.self.', 'attention.')}"


def routing_figure(result: dict[str, Any], sites: list[str] | None = None) -> Any:
    """Heatmaps of the mean routing probability per expert (columns) per task (rows), one panel per site; the
    matplotlib Figure."""
    import numpy as np
    from matplotlib.figure import Figure

    routing = result["routing"]
    tasks = list(routing)
    all_sites = list(routing[tasks[0]])
    if sites is None:
        # First, middle and last FFN-activation sites, plus the last layer's value site: enough to see whether
        # routing depends on the task and on depth.
        ffn = [s for s in all_sites if s.endswith("output.dense") and "attention" not in s] or all_sites
        sites = list(dict.fromkeys([ffn[0], ffn[len(ffn) // 2], ffn[-1]]))
        values = [s for s in all_sites if s.endswith("value")]
        if values:
            sites.append(values[-1])
    held = set(result["config"]["heldout_tasks"])
    labels = [f"{t} (held out)" if t in held else t for t in tasks]
    size = (4.2 * len(sites), 0.42 * len(tasks) + 1.8)
    fig = Figure(figsize=size)
    axes = fig.subplots(1, len(sites), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        m_TE = np.array([routing[t][site] for t in tasks])
        im = ax.imshow(m_TE, aspect="auto", cmap="viridis")
        ax.set_title(_site_title(site), fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(m_TE.shape[1]))
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [], fontsize=8)
        if ax is axes[0][0]:
            ax.set_ylabel("task")
        bar = fig.colorbar(im, ax=ax, fraction=0.046)
        bar.set_label("mean routing probability", fontsize=8)
    fig.suptitle(f"Mean routing probability per expert per task: {_describe(result)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_routing(result: dict[str, Any], path: str | Path, sites: list[str] | None = None) -> Path:
    """:func:`routing_figure` saved as a PNG at ``path``."""
    fig = routing_figure(result, sites)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
