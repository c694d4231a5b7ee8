"""The HTML report parses, names every expert of every MoE layer, embeds its plots (opens offline), and its figures
are the trace's own: each expert's share, dropped share and most frequent tokens recounted from the raw trace."""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser

import numpy as np

from moekit.analysis.trace import iter_windows, trace_model
from moekit.lab.analysis import categorize, render_report, summarise
from moekit.lab.analysis.report import expert_name
from tests.analysis.tiny_moe import tiny_moe


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.ids: set[str] = set()
        self.img_src: list[str] = []
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.img_src.append(a.get("src", ""))
        if tag in ("script", "link"):
            self.links.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_report_parses_and_names_every_expert():
    model = tiny_moe(top_k=2)
    tokens = np.random.default_rng(0).integers(0, 50, 160)
    trace = trace_model(model, iter_windows(tokens, 16, 5, None))
    vocab = [("Ġ" if i % 3 else "") + chr(ord("a") + i % 26) + ("<&>" if i == 7 else "") for i in range(50)]
    vocab = [v.replace("Ġ", " ") for v in vocab]
    cats = []
    for w in np.unique(trace.window_N):
        cats.extend(categorize([vocab[t] for t in trace.token_ids_N[trace.window_N == w]]))
    summary = summarise(trace, vocab, cats, num_permutations=10)
    html_text = render_report(summary, title="tiny", meta={"run": "x"})

    parser = _Collector()
    parser.feed(html_text)
    parser.close()
    text = " ".join(parser.text)
    for block in (1, 3):
        for e in range(4):
            assert expert_name(block, e) in text
            assert f"block{block}-expert{e}" in parser.ids
    # Plots are embedded PNGs: load, one specialisation heatmap per layer, one transition matrix.
    assert len(parser.img_src) == 4
    assert all(src.startswith("data:image/png;base64,") for src in parser.img_src)
    assert not parser.links and "http" not in html_text  # nothing to fetch
    assert "<&>" not in html_text  # token text is escaped
    assert summary["layers"][0]["load"]["dropped_share"] > 0


def _expert_rows(html_text: str) -> dict[tuple[int, int], list[str]]:
    """Cells of each expert's row, keyed by (block, expert), tags stripped."""
    rows = {}
    for m in re.finditer(r'<tr id="block(\d+)-expert(\d+)">(.*?)</tr>', html_text):
        cells = [re.sub(r"<[^>]+>", "", c).replace("&nbsp;", " ") for c in re.findall(r"<td[^>]*>(.*?)</td>", m[3])]
        rows[(int(m[1]), int(m[2]))] = cells
    return rows


def test_report_figures_are_recounted_from_the_trace():
    model = tiny_moe(top_k=2)
    tokens = np.random.default_rng(1).integers(0, 50, 160)
    trace = trace_model(model, iter_windows(tokens, 16, 5, None))
    vocab = [chr(ord("a") + i % 26) + str(i) for i in range(50)]  # unique, no escaping needed
    cats = []
    for w in np.unique(trace.window_N):
        cats.extend(categorize([vocab[t] for t in trace.token_ids_N[trace.window_N == w]]))
    summary = summarise(trace, vocab, cats, num_permutations=10)
    rows = _expert_rows(render_report(summary, title="tiny"))
    N, K = trace.num_tokens, trace.top_k
    assert len(rows) == len(trace.layer_blocks) * 4
    some_dropped = False
    for li, block in enumerate(trace.layer_blocks):
        ids_NK, kept_NK = trace.expert_ids_LNK[li], trace.kept_LNK[li]
        for e in range(4):
            cells = rows[(block, e)]
            chosen = ids_NK == e
            # share of assignments: this expert's (token, choice) pairs over all N * K of them
            assert float(cells[1]) == round(chosen.sum() / (N * K), 3)
            # dropped: of this expert's assignments, the share that got no capacity slot
            dropped = 1 - (chosen & kept_NK).sum() / chosen.sum() if chosen.any() else 0.0
            assert float(cells[2]) == round(float(dropped), 3)
            some_dropped |= dropped > 0
            # most frequent tokens with their counts: the first is the most common token routed to e (any rank)
            counts = Counter(trace.token_ids_N[chosen.any(axis=1)].tolist())
            shown = cells[6].split()
            if counts:
                text, count = shown[0], int(shown[1])
                assert count == max(counts.values()) and counts[vocab.index(text)] == count
    assert some_dropped  # capacity 1.0 with top-2 drops some assignments, so the dropped column is exercised
