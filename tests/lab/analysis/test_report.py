"""The HTML report parses, names every expert of every MoE layer, and embeds its plots (opens offline)."""

from __future__ import annotations

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
