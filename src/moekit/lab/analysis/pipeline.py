"""``moekit analyze`` end to end: load a trained MoE run, trace its routing over held-out text, compute the
statistics, and write the trace (JSONL and columnar safetensors), ``analysis.json`` and ``report.html``.

An encoder-decoder run (``model.arch = "seq2seq"``) is traced on held-out span-corruption examples (the encoder on
the corrupted inputs, the decoder on the targets with teacher forcing), one trace per stack, and the same examples
go through the untrained model (the run's config and seed, before any step) for the null models of
:func:`~moekit.lab.analysis.summary.summarise_seq2seq`."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.analysis.trace import RoutingTrace, iter_windows, trace_model, trace_seq2seq
from moekit.atomic import atomic_path, atomic_write_text, check_writable, make_dirs
from moekit.errors import MoekitError
from moekit.lab.analysis.categories import categorize, categorize_special, piece_text
from moekit.lab.analysis.report import render_report, render_seq2seq_report
from moekit.lab.analysis.summary import summarise, summarise_seq2seq
from moekit.lab.data.corpus import path_documents
from moekit.lab.data.tokenizer import load_tokenizer
from moekit.lab.training.plots import plot_load_balance
from moekit.lab.training.run import LoadedRun, load_trained_run

__all__ = ["analyze_run", "seq2seq_examples", "untrained_model"]


def _text_tokens(tok: Any, data_path: str) -> np.ndarray:
    docs = path_documents(data_path)
    if not docs:
        raise MoekitError(f"{data_path} holds no non-blank text")
    ids: list[int] = []
    for doc in docs:
        ids.extend(tok.encode(doc).ids)
    return np.asarray(ids, dtype=np.int64)


def _write(path: Path, writer: Callable[[Path], object]) -> None:
    """``writer(tmp)`` writes the file, renamed onto ``path`` once complete: a full disk leaves no half-written
    trace or report, and is one line naming the file (:mod:`moekit.atomic`)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def analyze_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    data: str | None = None,
    max_tokens: int | None = 32768,
    top_n: int = 10,
    num_permutations: int = 100,
    hash_draws: int = 20,
    fallback: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Analyse the routing of the run in ``run_dir`` over its validation split (or the text at ``data``: a file or
    a directory of files, tokenized with the run's tokenizer). Returns the summary written to ``analysis.json``.
    For an encoder-decoder run ``max_tokens`` counts encoder input tokens (whole examples of ``data.seq_len``),
    and ``hash_draws`` is the number of load-matched token hashes per layer (a decoder LM's analysis has none)."""
    log = log or (lambda msg: None)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    if Path(run_dir).is_dir():  # (a missing run directory is load_trained_run's one-line error)
        # Before loading and tracing the model: an output directory that cannot be written is reported now.
        check_writable(out)
    run = load_trained_run(run_dir, fallback=fallback, warn=log, command="analyze")
    if not run.model.moe_layers:
        raise MoekitError(f"{run_dir} is a dense model: it has no MoE layers, so no routing to analyse")
    tok = load_tokenizer(run.data.tokenizer_path)
    tokens = run.data.val_tokens if data is None else _text_tokens(tok, data)
    source = "the run's validation split" if data is None else str(data)
    if run.config.arch == "seq2seq":
        return _analyze_seq2seq(run, tok, tokens, source, out, max_tokens=max_tokens, top_n=top_n,
                                num_permutations=num_permutations, hash_draws=hash_draws)
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

    make_dirs(out)
    _write(out / "trace.jsonl", lambda tmp: trace.write_jsonl(tmp, token_texts, categories))
    _write(out / "trace.safetensors", trace.save_safetensors)
    atomic_write_text(out / "analysis.json", json.dumps(summary, indent=1))
    meta = {
        "run": str(run.run_dir),
        "checkpoint": f"{run.checkpoint.name} (step {run.step})",
        "text": f"{source}, {trace.num_tokens:,} tokens in windows of {seq_len}, "
        f"{run.config.train.batch_size} windows per call",
    }
    html_text = render_report(summary, title=f"Routing analysis: {run.run_dir.name}", meta=meta)
    atomic_write_text(out / "report.html", html_text)
    # How balanced each layer was over training, from the run's own log.
    balance = plot_load_balance(run.run_dir / "metrics.jsonl", out / "load_balance.png", title=run.run_dir.name)
    summary["load_balance_plot"] = None if balance is None else str(balance)
    summary["out_dir"] = str(out)
    return summary


def untrained_model(run: LoadedRun) -> torch.nn.Module:
    """The run's model before training: its config, initialised as ``moekit train`` initialises it (the global
    torch seed set to ``train.seed`` right before building; the caller's RNG state is left as it was), in eval
    mode. (A run started from given weights, ``train.init_from``, started from those instead.)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.config.train.seed)
        model = run.config.task.build_model(run.model.config)
    return model.eval()


def seq2seq_examples(run: LoadedRun, tokens: np.ndarray, max_tokens: int | None) -> list[tuple[Any, Any]]:
    """The span-corruption examples of ``tokens`` (window ``w`` masked with ``default_rng([0, w])``, as the
    validation data), ``train.batch_size`` per batch so the capacity per call is training's, at most
    ``max_tokens // data.seq_len`` examples (at least one)."""
    examples = run.config.task.examples(run.config, run.data, tokens)
    n = examples.num_windows
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // run.config.data.seq_len))
    bs = run.config.train.batch_size
    batches = []
    for inputs, labels in examples.batches(bs, -(-n // bs)):
        take = min(len(inputs), n - sum(len(b[0]) for b in batches))
        batches.append((inputs[:take], labels[:take]))
    return batches


def _stack_categories(trace: RoutingTrace, vocab_texts: list[str], sentinels: set[int], specials: set[int],
                      decoder: bool) -> list[str]:
    # Categories look at the previous token, which must be in the same example and stream.
    categories: list[str] = []
    for w in np.unique(trace.window_N):
        idx = np.nonzero(trace.window_N == w)[0]
        ids = trace.token_ids_N[idx].tolist()
        categories.extend(categorize_special(
            [vocab_texts[t] for t in ids], ids, sentinels, specials,
            start_is_special=decoder and int(trace.position_N[idx[0]]) == 0,
        ))
    return categories


def _analyze_seq2seq(
    run: LoadedRun, tok: Any, tokens: np.ndarray, source: str, out: Path, *, max_tokens: int | None, top_n: int,
    num_permutations: int, hash_draws: int,
) -> dict[str, Any]:
    batches = seq2seq_examples(run, tokens, max_tokens)
    traces = trace_seq2seq(run.model, batches)
    untrained = trace_seq2seq(untrained_model(run), batches)
    vocab_texts = [piece_text(tok.id_to_token(i) or "") for i in range(tok.get_vocab_size())]
    sentinels = set(run.data.sentinel_ids)
    specials = {run.data.eos_id}
    categories = {
        stack: _stack_categories(trace, vocab_texts, sentinels, specials, stack == "decoder")
        for stack, trace in traces.items()
    }
    summary = summarise_seq2seq(traces, untrained, vocab_texts, categories, top_n=top_n,
                                num_permutations=num_permutations, hash_draws=hash_draws)
    n_examples = sum(len(b[0]) for b in batches)
    inputs_len, targets_len = batches[0][0].shape[1], batches[0][1].shape[1]
    summary.update(
        {
            "run_dir": str(run.run_dir),
            "checkpoint": str(run.checkpoint),
            "step": run.step,
            "data": source,
            "num_examples": n_examples,
            "input_len": int(inputs_len),
            "target_len": int(targets_len),
            "untrained_seed": run.config.train.seed,
        }
    )
    make_dirs(out)
    for stack, trace in traces.items():
        texts = [vocab_texts[t] for t in trace.token_ids_N]
        jsonl = partial(trace.write_jsonl, token_texts=texts, categories=categories[stack])
        _write(out / f"{stack}_trace.jsonl", jsonl)
        _write(out / f"{stack}_trace.safetensors", trace.save_safetensors)
    atomic_write_text(out / "analysis.json", json.dumps(summary, indent=1))
    meta = {
        "run": str(run.run_dir),
        "checkpoint": f"{run.checkpoint.name} (step {run.step})",
        "text": f"{source}: {n_examples:,} span-corruption examples of {inputs_len} input / {targets_len} target "
        f"tokens, {run.config.train.batch_size} examples per call",
        "untrained model": f"the run's config initialised with train.seed = {run.config.train.seed}",
    }
    html_text = render_seq2seq_report(summary, title=f"Routing analysis: {run.run_dir.name}", meta=meta)
    atomic_write_text(out / "report.html", html_text)
    balance = plot_load_balance(run.run_dir / "metrics.jsonl", out / "load_balance.png", title=run.run_dir.name)
    summary["load_balance_plot"] = None if balance is None else str(balance)
    summary["out_dir"] = str(out)
    return summary
