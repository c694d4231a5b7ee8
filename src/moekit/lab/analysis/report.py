"""The routing report: one self-contained HTML file (plots embedded as base64 PNG data URIs, inline CSS, no script,
no CDN) that opens offline in any browser and parses with ``html.parser``.

Every expert of every MoE layer gets its own row, named "block B expert E" with anchor ``block{B}-expert{E}``:
its load, dropped share, specialisation (chi-square, p-value, the categories it over-represents) and its most
frequent tokens with counts.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from moekit.lab.analysis.plots import agreement_figure, load_figure, specialisation_figure

__all__ = ["render_report", "expert_name"]

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f6f6f6; padding: 0 2px; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


def expert_name(block: int, expert: int) -> str:
    """How the report names an expert (tests look for this string)."""
    return f"block {block} expert {expert}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _tok(text: str) -> str:
    # Make whitespace visible: a token " the" shows as "␣the", a newline as "↵".
    shown = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return f"<code>{html.escape(shown)}</code>"


def _fmt_p(p: float) -> str:
    return "&lt;1e-300" if p <= 0 else f"{p:.2g}"


def render_report(summary: dict[str, Any], *, title: str, meta: dict[str, str] | None = None) -> str:
    """The report as an HTML string."""
    names = summary["categories"]
    E = summary["num_experts"]
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        out.append("<table>")
        for k, v in meta.items():
            out.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>")
        out.append("</table>")
    out.append(
        f"<p>{summary['num_tokens']:,} tokens analysed; {E} experts per MoE layer, top-{summary['top_k']} routing. "
        "Loads and specialisation count every router choice (kept or dropped for capacity).</p>"
    )

    out.append("<h2>Load, drops and router entropy</h2>")
    out.append(
        "<table><tr><th>MoE layer</th><th>dropped share</th><th>tokens with every choice dropped</th>"
        "<th>router entropy (nats)</th><th>entropy / log E</th><th>mean top-1 probability</th>"
        "<th>max expert share</th><th>min expert share</th></tr>"
    )
    for layer in summary["layers"]:
        ld = layer["load"]
        out.append(
            f"<tr><td>block {layer['block']}</td><td class=num>{ld['dropped_share']:.3f}</td>"
            f"<td class=num>{ld['tokens_fully_dropped_share']:.3f}</td><td class=num>{ld['entropy']:.3f}</td>"
            f"<td class=num>{ld['entropy_normalised']:.3f}</td><td class=num>{ld['mean_top1_prob']:.3f}</td>"
            f"<td class=num>{max(ld['share_per_expert']):.3f}</td>"
            f"<td class=num>{min(ld['share_per_expert']):.3f}</td></tr>"
        )
    out.append("</table>")
    out.append(_img(load_figure(summary), "expert load per layer"))

    out.append("<h2>Token-category specialisation</h2>")
    out.append(
        "<p class=note>Categories (one per token, first rule that matches): whitespace, punctuation, number, "
        "continuation (a word piece continuing the previous word), function (a fixed list of English function "
        "words), capitalised, other. For each expert: its category shares against the corpus shares; "
        "chi-square goodness of fit (p-value: could the expert's mix be the corpus mix by chance?) and, per "
        "layer, the mutual information between top-1 expert and category against a label-permutation "
        "baseline.</p>"
    )
    out.append("<table><tr><th>category</th><th>corpus count</th><th>corpus share</th></tr>")
    for c, name in enumerate(names):
        out.append(
            f"<tr><td>{name}</td><td class=num>{summary['corpus_category_counts'][c]:,}</td>"
            f"<td class=num>{summary['corpus_category_share'][c]:.3f}</td></tr>"
        )
    out.append("</table>")
    for li, layer in enumerate(summary["layers"]):
        b = layer["block"]
        out.append(f"<h3>MoE layer at block {b}</h3>")
        out.append(
            f"<p>Mutual information (top-1 expert; category): {layer['category_mi_bits']:.4f} bits, chance "
            f"(shuffled experts) {layer['category_mi_chance_bits']:.4f} bits, permutation p = "
            f"{layer['category_mi_p_value']:.3g}. Chi-square degrees of freedom per expert: "
            f"{layer['chi2_dof']}.</p>"
        )
        out.append(_img(specialisation_figure(summary, li), f"category specialisation, block {b}"))
        out.append(
            "<table><tr><th>expert</th><th>share of assignments</th><th>dropped</th><th>chi-square</th>"
            "<th>p-value</th><th>over-represented categories (share / corpus share)</th>"
            "<th>most frequent tokens (count)</th></tr>"
        )
        for ex in layer["experts"]:
            e = ex["expert"]
            over = sorted(
                ((v, names[c]) for c, v in enumerate(ex["enrichment"]) if v is not None and v >= 1.5
                 and ex["category_counts"][c] >= 5),
                reverse=True,
            )
            over_txt = ", ".join(f"{n} {v:.1f}x" for v, n in over) or "none"
            toks = " ".join(f"{_tok(t['text'])}&nbsp;{t['count']}" for t in ex["top_tokens"]) or "(no tokens)"
            out.append(
                f'<tr id="block{b}-expert{e}"><td>{expert_name(b, e)}</td>'
                f"<td class=num>{layer['load']['share_per_expert'][e]:.3f}</td>"
                f"<td class=num>{layer['load']['dropped_share_per_expert'][e]:.3f}</td>"
                f"<td class=num>{ex['chi2']:.1f}</td><td class=num>{_fmt_p(ex['p_value'])}</td>"
                f"<td>{html.escape(over_txt)}</td><td>{toks}</td></tr>"
            )
        out.append("</table>")

    out.append("<h2>Routing agreement across consecutive MoE layers</h2>")
    if not summary["agreement"]:
        out.append("<p>Only one MoE layer: nothing to compare.</p>")
    for ai, a in enumerate(summary["agreement"]):
        out.append(
            f"<h3>block {a['from_block']} &rarr; block {a['to_block']}</h3><p>Share of tokens whose next-layer "
            f"expert is their expert's most common successor: {a['best_successor_share']:.3f} (independent "
            f"routing with the same loads: {a['chance_successor_share']:.3f}). Mutual information "
            f"{a['mutual_information_bits']:.4f} bits, chance {a['mutual_information_chance_bits']:.4f} bits, "
            f"permutation p = {a['p_value']:.3g}.</p>"
        )
        out.append(_img(agreement_figure(summary, ai), f"transitions block {a['from_block']} to {a['to_block']}"))
    out.append("</body></html>")
    return "\n".join(out)
