"""The routing report: one self-contained HTML file (plots embedded as base64 PNG data URIs, inline CSS, no script,
no CDN) that opens offline in any browser and parses with ``html.parser``.

Every expert of every MoE layer gets its own row, named "block B expert E" with anchor ``block{B}-expert{E}``:
its load, dropped share, specialisation (chi-square, p-value, the categories it over-represents) and its most
frequent tokens with counts. An encoder-decoder's report (:func:`render_seq2seq_report`) opens with the
specialisation of each stack against its null models, then repeats the sections per stack, its experts named
"encoder block B expert E" (anchor ``encoder-block{B}-expert{E}``).
"""

from __future__ import annotations

import base64
import html
from typing import Any

from moekit.lab.analysis.plots import agreement_figure, layer_label, load_figure, specialisation_figure

__all__ = ["render_report", "render_seq2seq_report", "expert_name"]

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


def expert_name(block: int, expert: int, stack: str | None = None) -> str:
    """How the report names an expert (tests look for this string): "block B expert E", or for a stack of an
    encoder-decoder "encoder block B expert E"."""
    return f"block {block} expert {expert}" if stack is None else f"{stack} block {block} expert {expert}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _tok(text: str) -> str:
    # Make whitespace visible: a token " the" shows as "␣the", a newline as "↵".
    shown = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return f"<code>{html.escape(shown)}</code>"


def _fmt_p(p: float) -> str:
    return "&lt;1e-300" if p <= 0 else f"{p:.2g}"


def _head(title: str, meta: dict[str, str] | None) -> list[str]:
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
    return out


def _heading(prefix: str | None, text: str) -> str:
    # "Load, drops ..." for a decoder LM; "Encoder: load, drops ..." for a stack of an encoder-decoder.
    return text if prefix is None else f"{prefix}: {text[0].lower()}{text[1:]}"


def _null_models(layer: dict[str, Any]) -> str:
    """The encoder-decoder's null models of one layer, in a sentence (empty for a layer without them)."""
    if "hash" not in layer:
        return ""
    h = layer["hash"]
    return (
        f"<p>Null models: the untrained model (same config, its seed's initialisation) "
        f"{layer['untrained']['category_mi_bits']:.4f} bits; a random token-to-expert hash with this layer's loads "
        f"{h['mutual_information_bits']:.4f} &plusmn; {h['mutual_information_std_bits']:.4f} bits over "
        f"{h['draws']} draws (trained &le; hash in a share p = {h['p_value']:.3g}; hash loads within "
        f"{h['max_load_deviation']:.3f} of the trained shares).</p>"
    )


def _sections(summary: dict[str, Any], out: list[str], prefix: str | None = None, stack: str | None = None) -> None:
    """The load, specialisation and agreement sections of one analysis (a decoder LM's, or one stack's)."""
    names = summary["categories"]
    E = summary["num_experts"]
    out.append(
        f"<p>{summary['num_tokens']:,} tokens analysed; {E} experts per MoE layer, top-{summary['top_k']} routing. "
        "Loads and specialisation count every router choice (kept or dropped for capacity).</p>"
    )

    out.append(f"<h2>{_heading(prefix, 'Load, drops and router entropy')}</h2>")
    out.append(
        "<table><tr><th>MoE layer</th><th>dropped share</th><th>tokens with every choice dropped</th>"
        "<th>router entropy (nats)</th><th>entropy / log E</th><th>mean top-1 probability</th>"
        "<th>max expert share</th><th>min expert share</th></tr>"
    )
    for layer in summary["layers"]:
        ld = layer["load"]
        out.append(
            f"<tr><td>{layer_label(layer)}</td><td class=num>{ld['dropped_share']:.3f}</td>"
            f"<td class=num>{ld['tokens_fully_dropped_share']:.3f}</td><td class=num>{ld['entropy']:.3f}</td>"
            f"<td class=num>{ld['entropy_normalised']:.3f}</td><td class=num>{ld['mean_top1_prob']:.3f}</td>"
            f"<td class=num>{max(ld['share_per_expert']):.3f}</td>"
            f"<td class=num>{min(ld['share_per_expert']):.3f}</td></tr>"
        )
    out.append("</table>")
    out.append(_img(load_figure(summary), "expert load per layer"))

    out.append(f"<h2>{_heading(prefix, 'Token-category specialisation')}</h2>")
    extra = ""
    if "sentinel" in names:
        extra = " Span corruption adds two, checked first: sentinel (&lt;extra_id_i&gt;) and special (end-of-text, "
        extra += "and the decoder's start token)."
    out.append(
        "<p class=note>Categories (one per token, first rule that matches): whitespace, punctuation, number, "
        "continuation (a word piece continuing the previous word), function (a fixed list of English function "
        f"words), capitalised, other.{extra} For each expert: its category shares against the corpus shares; "
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
        label = layer_label(layer)
        out.append(f"<h3>MoE layer at {label}</h3>")
        out.append(
            f"<p>Mutual information (top-1 expert; category): {layer['category_mi_bits']:.4f} bits, chance "
            f"(shuffled experts) {layer['category_mi_chance_bits']:.4f} bits, permutation p = "
            f"{layer['category_mi_p_value']:.3g}. Chi-square degrees of freedom per expert: "
            f"{layer['chi2_dof']}.</p>"
        )
        nulls = _null_models(layer)
        if nulls:
            out.append(nulls)
        out.append(_img(specialisation_figure(summary, li), f"category specialisation, {label}"))
        out.append(
            "<table><tr><th>expert</th><th>share of assignments</th><th>dropped</th><th>chi-square</th>"
            "<th>p-value</th><th>over-represented categories (share / corpus share)</th>"
            "<th>most frequent tokens (count)</th></tr>"
        )
        anchor = f"block{b}" if stack is None else f"{stack}-block{b}"
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
                f'<tr id="{anchor}-expert{e}"><td>{expert_name(b, e, stack)}</td>'
                f"<td class=num>{layer['load']['share_per_expert'][e]:.3f}</td>"
                f"<td class=num>{layer['load']['dropped_share_per_expert'][e]:.3f}</td>"
                f"<td class=num>{ex['chi2']:.1f}</td><td class=num>{_fmt_p(ex['p_value'])}</td>"
                f"<td>{html.escape(over_txt)}</td><td>{toks}</td></tr>"
            )
        out.append("</table>")

    out.append(f"<h2>{_heading(prefix, 'Routing agreement across consecutive MoE layers')}</h2>")
    if not summary["agreement"]:
        out.append("<p>Only one MoE layer: nothing to compare.</p>")
    for ai, a in enumerate(summary["agreement"]):
        from_name = a.get("from_name", f"block {a['from_block']}")
        to_name = a.get("to_name", f"block {a['to_block']}")
        out.append(
            f"<h3>{from_name} &rarr; {to_name}</h3><p>Share of tokens whose next-layer "
            f"expert is their expert's most common successor: {a['best_successor_share']:.3f} (independent "
            f"routing with the same loads: {a['chance_successor_share']:.3f}). Mutual information "
            f"{a['mutual_information_bits']:.4f} bits, chance {a['mutual_information_chance_bits']:.4f} bits, "
            f"permutation p = {a['p_value']:.3g}.</p>"
        )
        # (A decoder LM's alt text keeps its old form, "transitions block 1 to 3".)
        alt = f"transitions {from_name} to {a.get('to_name', a['to_block'])}"
        out.append(_img(agreement_figure(summary, ai), alt))


def render_report(summary: dict[str, Any], *, title: str, meta: dict[str, str] | None = None) -> str:
    """The report as an HTML string (a decoder LM's analysis, :func:`moekit.lab.analysis.summary.summarise`)."""
    out = _head(title, meta)
    _sections(summary, out)
    out.append("</body></html>")
    return "\n".join(out)


def render_seq2seq_report(summary: dict[str, Any], *, title: str, meta: dict[str, str] | None = None) -> str:
    """The report of an encoder-decoder's analysis (:func:`moekit.lab.analysis.summary.summarise_seq2seq`): the
    null-model comparison per stack and per layer first, then each stack's sections as for a decoder LM."""
    out = _head(title, meta)
    out.append("<h2>Specialisation against null models</h2>")
    out.append(
        "<p class=note>Mutual information in bits between a token's top-1 expert and its category, for the trained "
        "model, the untrained model (same config, its seed's initialisation, on the same examples), a random "
        "token-to-expert hash that keeps the trained layer's expert loads (mean over draws), and the trained "
        "experts with shuffled labels (the independence baseline, which any router that looks at the token beats). "
        "H(category) bounds every MI. Per stack: means over its MoE layers.</p>"
    )
    out.append(
        "<table><tr><th>stack</th><th>MoE layers</th><th>tokens</th><th>H(category)</th><th>trained</th>"
        "<th>untrained</th><th>load-matched hash</th><th>shuffled labels</th></tr>"
    )
    for line in summary["stack_summary"]:
        out.append(
            f"<tr><td>{line['stack']}</td><td>{html.escape(', '.join(line['layers']))}</td>"
            f"<td class=num>{line['num_tokens']:,}</td><td class=num>{line['category_entropy_bits']:.3f}</td>"
            f"<td class=num>{line['trained_mi_bits']:.4f}</td><td class=num>{line['untrained_mi_bits']:.4f}</td>"
            f"<td class=num>{line['hash_mi_bits']:.4f}</td><td class=num>{line['shuffled_mi_bits']:.4f}</td></tr>"
        )
    out.append("</table>")
    out.append(
        "<table><tr><th>MoE layer</th><th>trained</th><th>untrained</th><th>load-matched hash</th>"
        "<th>p (hashes &ge; trained)</th><th>shuffled labels</th></tr>"
    )
    for stack in summary["stacks"].values():
        for layer in stack["layers"]:
            h = layer["hash"]
            out.append(
                f"<tr><td>{layer_label(layer)}</td><td class=num>{layer['category_mi_bits']:.4f}</td>"
                f"<td class=num>{layer['untrained']['category_mi_bits']:.4f}</td>"
                f"<td class=num>{h['mutual_information_bits']:.4f}</td><td class=num>{h['p_value']:.3g}</td>"
                f"<td class=num>{layer['category_mi_chance_bits']:.4f}</td></tr>"
            )
    out.append("</table>")
    for name, stack in summary["stacks"].items():
        out.append(f"<h2>{html.escape(name.capitalize())}</h2>")
        _sections(stack, out, prefix=name.capitalize(), stack=name)
    out.append("</body></html>")
    return "\n".join(out)
