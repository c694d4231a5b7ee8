"""Hugging Face checkpoints in and out: ``from_pretrained`` reads a ``save_pretrained`` directory (config.json and
safetensors, sharded or not) into a moekit :class:`~moekit.models.TransformerLM`; ``save_pretrained`` writes one
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
(sparse) and Llama, Qwen2, Qwen3 (dense); the encoder-decoders T5 and Switch Transformers read into and write from
a :class:`~moekit.models.Seq2SeqLM` (``hf/seq2seq.py``). Nothing here imports transformers or touches the network,
and nothing is unpickled. See docs/INTEROP.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.errors import MoekitError
from moekit.hf.families import FAMILIES, Family, family_for_model_type, hf_config_from_lm, infer_family
from moekit.hf.families import lm_config_from_hf as _lm_config_from_hf
from moekit.hf.safetensors_io import SafetensorsReader, write_checkpoint
from moekit.hf.seq2seq import (
    SEQ2SEQ_FAMILIES,
    hf_config_from_seq2seq,
    infer_seq2seq_family,
    load_seq2seq_weights,
    save_seq2seq_pretrained,
    seq2seq_config_from_hf,
)
from moekit.hf.weights import hf_tensors, load_hf_weights
from moekit.models.config import LMConfig
from moekit.models.lm import TransformerLM
from moekit.models.seq2seq import Seq2SeqLM
from moekit.models.seq2seq_config import Seq2SeqConfig

__all__ = [
    "FAMILIES",
    "Family",
    "export_family",
    "HFCheckpoint",
    "from_pretrained",
    "infer_family",
    "read_hf_config",
    "save_pretrained",
]


@dataclass
class HFCheckpoint:
    """What :func:`read_hf_config` finds in a ``save_pretrained`` directory.

    Attributes:
        family: the model family (from ``model_type``).
        config: the moekit model config (a :class:`Seq2SeqConfig` for T5 and Switch Transformers).
        raw: the ``config.json`` as read (token ids etc. are kept from it on export).
    """

    family: Family
    config: LMConfig | Seq2SeqConfig
    raw: dict[str, Any]


def read_hf_config(path: str | Path) -> HFCheckpoint:
    """Read and check ``path/config.json``: a one-line :class:`MoekitError` for a missing or unreadable file, an
    unknown ``model_type`` or an option moekit does not compute."""
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise MoekitError(f"{path} is not a directory")
    if not cfg_path.is_file():
        raise MoekitError(f"{path} has no config.json (is it a save_pretrained directory?)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MoekitError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise MoekitError(f"{cfg_path}: expected a JSON object")
    try:
        if raw.get("model_type") in SEQ2SEQ_FAMILIES:
            family, config = seq2seq_config_from_hf(raw)
        else:
            family, config = _lm_config_from_hf(raw)
    except (TypeError, ValueError) as exc:  # a value of the wrong type, or one LMConfig refuses
        if isinstance(exc, MoekitError):
            raise
        raise MoekitError(f"{cfg_path}: {exc}") from None
    return HFCheckpoint(family, config, raw)


def from_pretrained(path: str | Path, *, dtype: torch.dtype = torch.float32) -> TransformerLM | Seq2SeqLM:
    """The model of a Hugging Face ``save_pretrained`` directory (a :class:`Seq2SeqLM` for T5 and Switch
    Transformers), in eval mode, with parameters in ``dtype``.

    Tensors are streamed from the safetensors files into the model one at a time, so the peak memory is about the
    model's size. Every tensor must be used and have the shape the config implies."""
    ckpt = read_hf_config(path)
    reader = SafetensorsReader(path)
    # Built in place (on the meta device the initialisers pull in ~75 MB of torch machinery, more than they
    # save on small models); the caller's RNG stream stays untouched. Every parameter is then set to NaN, so a tensor
    # the loader missed would show, and filled from the checkpoint tensor by tensor.
    with torch.random.fork_rng(devices=[]):
        seq2seq = isinstance(ckpt.config, Seq2SeqConfig)
        model = (Seq2SeqLM if seq2seq else TransformerLM)(ckpt.config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    (load_seq2seq_weights if seq2seq else load_hf_weights)(model, reader, ckpt.family)
    for name, p in model.named_parameters():
        # In chunks: a whole-tensor isfinite would allocate a quarter of the largest tensor.
        if not all(bool(torch.isfinite(chunk).all()) for chunk in p.detach().reshape(-1).split(1 << 20)):
            raise MoekitError(f"{path}: parameter {name} holds non-finite values after loading (NaN or inf in the "
                              "checkpoint, or a tensor it lacks)")
    return model.eval()


def export_family(config: LMConfig | Seq2SeqConfig, model_type: str | None = None) -> Family:
    """The family a model of ``config`` is written as (``model_type``, or the first that represents it exactly);
    a one-line :class:`MoekitError` when that family cannot represent it. Nothing is written."""
    if isinstance(config, Seq2SeqConfig):
        if model_type is not None and model_type not in SEQ2SEQ_FAMILIES:
            raise MoekitError(f"model_type {model_type!r} is not an encoder-decoder family (t5, switch_transformers)")
        fam = SEQ2SEQ_FAMILIES[model_type] if model_type is not None else infer_seq2seq_family(config)
        hf_config_from_seq2seq(config, fam)
        return fam
    fam = family_for_model_type(model_type) if model_type is not None else infer_family(config)
    hf_config_from_lm(config, fam)
    return fam


def save_pretrained(
    model: TransformerLM | Seq2SeqLM,
    path: str | Path,
    *,
    model_type: str | None = None,
    extra_config: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Family:
    """Write ``model`` as a Hugging Face checkpoint in ``path`` (created if needed; each file written atomically):
    ``config.json`` and ``model.safetensors`` (or shards and an index). ``model_type`` picks the family; by default
    the first that represents the model exactly (:func:`infer_family`). ``extra_config``: keys of an imported
    ``config.json`` to keep (token ids). Returns the family written. A :class:`Seq2SeqLM` is written as T5 or Switch
    Transformers (:func:`moekit.hf.seq2seq.save_seq2seq_pretrained`)."""
    if isinstance(model, Seq2SeqLM):
        return save_seq2seq_pretrained(model, path, model_type=model_type, extra_config=extra_config,
                                       max_shard_bytes=max_shard_bytes)
    if not isinstance(model, TransformerLM):
        raise ValueError(f"save_pretrained expects a TransformerLM, got {type(model).__name__}")
    fam = family_for_model_type(model_type) if model_type is not None else infer_family(model.config)
    write_checkpoint(path, hf_tensors(model, fam), hf_config_from_lm(model.config, fam, extra_config), max_shard_bytes)
    return fam
