"""The load-balance plot of a run: written from the log's loads (bias panel when the run logged bias ranges), and
nothing for a dense run."""

from __future__ import annotations

import json

from moekit.lab.training.plots import plot_load_balance


def _log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_load_balance(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _log(log, [{"step": s, "loss": 1.0, "tokens_per_expert": [[4, 2, 2, 0], [2, 2, 2, 2]],
                "expert_bias_range_per_layer": [0.01 * s, 0.0]} for s in (1, 2, 3)])
    out = plot_load_balance(log, tmp_path / "balance.png", title="run")
    assert out == tmp_path / "balance.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _log(log, [{"step": 1, "loss": 1.0}])  # a dense run logs no loads
    assert plot_load_balance(log, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
