"""Hugging Face models as moekit run directories, and run directories as Hugging Face models: what ``moekit
import-hf`` and ``moekit export-hf`` do around :mod:`moekit.hf`.

An imported run directory is an ordinary run (``eval``, ``generate``, ``analyze``, ``finetune``, ``distill``,
``upcycle`` and ``train --resume`` take it) whose weights are the initial weights (``train.init_from``), whose
tokenizer is the model's own (``data.tokenizer = "imported"``: copied, never retrained), and whose token ids are the
chosen corpus encoded with that tokenizer, documents separated by the model's end-of-sequence token. The original
``config.json`` and tokenizer files are kept under ``hf/`` so that an export writes them back.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file as np_save_file

from moekit.atomic import atomic_dir, atomic_write_text
from moekit.errors import MoekitError
from moekit.hf import export_family, from_pretrained, read_hf_config, save_pretrained
from moekit.lab.data.config import Seq2SeqDataConfig
from moekit.lab.data.corpus import load_corpus
from moekit.lab.data.split import cut_pieces, split_pieces
from moekit.lab.data.tokenizer import EOT, encode_pieces, load_tokenizer, sentinel_token
from moekit.lab.training.run import load_trained_run, start_run_from_weights
from moekit.lab.training.run_config import RunConfig, build_run_config
from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE, task_of

__all__ = ["import_hf_run", "export_hf_run", "HF_FILES_DIR"]

HF_FILES_DIR = "hf"  # the imported model's own small files, written back on export
_KEPT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")


def _separator_id(raw: dict[str, Any], tok: Any, vocab: int) -> int | None:
    """The id that ends a document: the config's ``eos_token_id`` (the first of a list), else the tokenizer's
    ``<|endoftext|>``; None when neither exists (documents are then simply concatenated)."""
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int) and 0 <= eos < vocab:
        return eos
    return tok.token_to_id(EOT)


def _count_sentinels(tok: Any) -> int:
    """How many of T5's ``<extra_id_0>``, ``<extra_id_1>``, ... the tokenizer has, in order."""
    n = 0
    while tok.token_to_id(sentinel_token(n)) is not None:
        n += 1
    if n == 0:
        raise MoekitError("the tokenizer has no sentinel tokens (<extra_id_0> ...): span corruption needs them")
    return n


def import_hf_run(
    hf_dir: str | Path,
    run_dir: str | Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> RunConfig:
    """Turn the ``save_pretrained`` directory ``hf_dir`` into a new run directory ``run_dir``. ``overrides``:
    ``--set`` tables for ``[data]`` (corpus, seq_len, ...) and ``[train]``; the model is the checkpoint's.

    The run directory appears complete or not at all (it is assembled beside ``run_dir`` and renamed)."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if run_dir.exists():
        raise MoekitError(f"{run_dir} already exists; choose a new --out directory")
    overrides = overrides or {}
    bad = sorted(set(overrides) - {"data", "train"})
    if bad:
        raise MoekitError(f"--set may change [data] and [train] of an imported run, not [{bad[0]}]")
    ckpt = read_hf_config(hf_dir)
    lm = ckpt.config
    task = task_of(lm)
    tok_src = hf_dir / TOKENIZER_FILE
    if not tok_src.is_file():
        raise MoekitError(
            f"{hf_dir} has no {TOKENIZER_FILE}: moekit needs the model's fast tokenizer to encode text for it"
        )
    tok = load_tokenizer(tok_src)
    if tok.get_vocab_size() > lm.vocab_size:
        raise MoekitError(
            f"{tok_src} has {tok.get_vocab_size()} tokens but the model's vocabulary is {lm.vocab_size}"
        )
    # An encoder-decoder's context is not bounded by a position table (relative position buckets).
    max_len = getattr(lm, "max_seq_len", None) or 2**31 - 1
    data_values = {"seq_len": min(128, max_len), **overrides.get("data", {}),
                   "vocab_size": lm.vocab_size, "tokenizer": "imported"}
    if issubclass(task.data_config, Seq2SeqDataConfig):  # span corruption uses the tokenizer's own sentinels
        data_values["sentinels"] = _count_sentinels(tok)
    tables = {"data": data_values, "train": overrides.get("train", {})}
    # The [model] and [moe] tables of the imported config, through the same parser as every run config.
    probe = RunConfig(model=lm, data=task.data_config(**{k: v for k, v in data_values.items() if k != "seq_len"},
                                                       seq_len=min(data_values["seq_len"], max_len)))
    resolved = probe.resolved()
    tables["model"] = resolved["model"]
    if "moe" in resolved:
        tables["moe"] = resolved["moe"]
    run_config = build_run_config(tables)
    model = from_pretrained(hf_dir)
    d = run_config.data
    docs = load_corpus(d.corpus, d.cache_dir, max_chars=d.max_chars, log=log)
    train_pieces, val_pieces = split_pieces(cut_pieces(docs, d.piece_chars, d.max_chars), d.val_fraction)
    separator = _separator_id(ckpt.raw, tok, lm.vocab_size)
    train_tokens = encode_pieces(tok, train_pieces, eot_id=separator)
    val_tokens = encode_pieces(tok, val_pieces, eot_id=separator)
    log(f"{ckpt.family.model_type} model: {sum(p.numel() for p in model.parameters()):,} parameters; corpus "
        f"{d.corpus!r} -> {len(train_tokens):,} training and {len(val_tokens):,} validation tokens")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(run_dir) as tmp:
        (tmp / TOKENS_FILE).parent.mkdir(parents=True)
        np_save_file({"train": train_tokens, "val": val_tokens}, str(tmp / TOKENS_FILE))
        shutil.copyfile(tok_src, tmp / TOKENIZER_FILE)
        (tmp / HF_FILES_DIR).mkdir()
        for name in _KEPT_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / HF_FILES_DIR / name)
        start_run_from_weights(run_config, tmp, model)
    return run_config


def export_hf_run(
    run_dir: str | Path, out: str | Path, *, model_type: str | None = None,
    warn: Callable[[str], None] = lambda msg: None,
) -> str:
    """Write the newest valid weights of ``run_dir`` (a checkpoint, else the initial weights) as a Hugging Face
    checkpoint in the new directory ``out``, with the run's tokenizer. Returns the family's ``model_type``."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoekitError(f"{out} exists and is not empty; choose a new --out directory")
    run = load_trained_run(run_dir, fallback=True, warn=warn, command="generate")
    cfg = run.config.model
    fam = export_family(cfg, model_type)  # refuses a family that cannot represent the model, before any write
    moe = run.config.moe
    if moe is not None and moe.capacity_factor is not None:
        warn(f"the run routes with capacity factor {moe.capacity_factor} (tokens over capacity are dropped); "
             "the exported model never drops (Hugging Face MoE blocks are dropless)")
    kept = run_dir / HF_FILES_DIR
    extra = json.loads((kept / "config.json").read_text(encoding="utf-8")) if (kept / "config.json").is_file() else {}
    if not extra:  # a moekit-trained run: its end-of-text token ends sequences
        tok = load_tokenizer(run.data.tokenizer_path)
        eot = tok.token_to_id(EOT)
        extra = {"eos_token_id": eot, "bos_token_id": None, "pad_token_id": None}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        out.rmdir()  # empty (checked above): the complete directory is renamed into its place
    with atomic_dir(out) as tmp:
        save_pretrained(run.model, tmp, model_type=fam.model_type, extra_config=extra)
        for name in _KEPT_FILES:
            if name != "config.json" and (kept / name).is_file():
                shutil.copyfile(kept / name, tmp / name)
        if not (tmp / TOKENIZER_FILE).is_file():
            shutil.copyfile(run.data.tokenizer_path, tmp / TOKENIZER_FILE)
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT}
            if getattr(cfg, "max_seq_len", None):
                tok_cfg["model_max_length"] = cfg.max_seq_len
            atomic_write_text(tmp / "tokenizer_config.json", json.dumps(tok_cfg, indent=2))
    return fam.model_type

