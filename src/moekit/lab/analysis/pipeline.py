"""``moekit analyze`` end to end: load a trained MoE run, trace its routing over held-out text, compute the
statistics, and write the trace (JSONL and columnar safetensors), ``analysis.json`` and ``report.html``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moekit.analysis.trace import iter_windows, trace_model
from moekit.errors import MoekitError
from moekit.lab.analysis.categories import categorize, piece_text
from moekit.lab.analysis.report import render_report
from moekit.lab.analysis.summary import summarise
from moekit.lab.data.corpus import path_documents
from moekit.lab.data.tokenizer import load_tokenizer
from moekit.lab.training.plots import plot_load_balance
from moekit.lab.training.run import load_trained_run

__all__ = ["analyze_run"]


def _text_tokens(tok: Any, data_path: str) -> np.ndarray:
    docs = path_documents(data_path)
    if not docs:
        raise MoekitError(f"{data_path} holds no non-blank text")
    ids: list[int] = []
    for doc in docs:
        ids.extend(tok.encode(doc).ids)
    return np.asarray(ids, dtype=np.int64)


def analyze_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    data: str | None = None,
    max_tokens: int | None = 32768,
    top_n: int = 10,
    num_permutations: int = 100,
    fallback: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Analyse the routing of the run in ``run_dir`` over its validation split (or the text at ``data``: a file or
    a directory of files, tokenized with the run's tokenizer). Returns the summary written to ``analysis.json``."""
    log = log or (lambda msg: None)
    run = load_trained_run(run_dir, fallback=fallback, warn=log, command="analyze")
    if not run.model.moe_layers:
        raise MoekitError(f"{run_dir} is a dense model: it has no MoE layers, so no routing to analyse")
    tok = load_tokenizer(run.data.tokenizer_path)
    tokens = run.data.val_tokens if data is None else _text_tokens(tok, data)
    source = "the run's validation split" if data is None else str(data)
    seq_len = run.config.data.seq_len
    # The layer routes a whole call as one group, so drops depend on how many tokens a call holds: analyse with
    # the training batch size so the capacity matches training.
    trace = trace_model(run.model, iter_windows(tokens, seq_len, run.config.train.batch_size, max_tokens))
    vocab_texts = [piece_text(tok.id_to_token(i) or "") for i in range(tok.get_vocab_size())]
    token_texts = [vocab_texts[t] for t in trace.token_ids_N]
    # Categories look at the previous token, which must be in the same window.
    categories: list[str] = []
    for w in np.unique(trace.window_N):
        idx = np.nonzero(trace.window_N == w)[0]
        categories.extend(categorize([token_texts[i] for i in idx]))
    summary = summarise(trace, vocab_texts, categories, top_n=top_n, num_permutations=num_permutations)
    summary["run_dir"] = str(run.run_dir)
    summary["checkpoint"] = str(run.checkpoint)
    summary["step"] = run.step
    summary["data"] = source

    out = Path(out_dir) if out_dir is not None else run.run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    trace.write_jsonl(out / "trace.jsonl", token_texts, categories)
    trace.save_safetensors(out / "trace.safetensors")
    (out / "analysis.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    meta = {
        "run": str(run.run_dir),
        "checkpoint": f"{run.checkpoint.name} (step {run.step})",
        "text": f"{source}, {trace.num_tokens:,} tokens in windows of {seq_len}, "
        f"{run.config.train.batch_size} windows per call",
    }
    html_text = render_report(summary, title=f"Routing analysis: {run.run_dir.name}", meta=meta)
    (out / "report.html").write_text(html_text, encoding="utf-8")
    # How balanced each layer was over training, from the run's own log.
    balance = plot_load_balance(run.run_dir / "metrics.jsonl", out / "load_balance.png", title=run.run_dir.name)
    summary["load_balance_plot"] = None if balance is None else str(balance)
    summary["out_dir"] = str(out)
    return summary
