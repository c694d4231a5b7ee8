"""Byte-level BPE (GPT-2 style) trained with the ``tokenizers`` package, saved as ``tokenizer.json`` in the
run.

Byte-level means every string round-trips (``decode(encode(s)) == s``) and nothing is out of vocabulary. Id 0 is
the end-of-text token that separates documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.errors import MoekitError
from moekit.lab.data.split import Piece

__all__ = ["EOT", "train_tokenizer", "load_tokenizer", "encode_pieces"]

EOT = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (the training split only, so validation text never shapes the
    merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise MoekitError(f"tokenizer file {p} is missing")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # the tokenizers package raises its own exception type
        raise MoekitError(f"cannot read tokenizer {p}: {exc}") from None


def encode_pieces(tok: Tokenizer, pieces: list[Piece]) -> np.ndarray:
    """One int32 array: the pieces' ids in order, with the end-of-text id after each document's last piece."""
    eot = tok.token_to_id(EOT)
    encodings = tok.encode_batch([text for _, text, _ in pieces], add_special_tokens=False)
    parts = []
    for (_, _, last), enc in zip(pieces, encodings, strict=True):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        if last:
            parts.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
