"""Byte-level BPE (GPT-2 style) trained with the ``tokenizers`` package, saved as ``tokenizer.json`` in the
run.

Byte-level means every string round-trips (``decode(encode(s)) == s``) and nothing is out of vocabulary. Id 0 is
the end-of-text token that separates documents.

For T5-style span corruption (:mod:`moekit.data.span_corruption`) the tokenizer can also hold sentinel tokens
``<extra_id_0>`` ... ``<extra_id_{n-1}>``: special tokens with ids 1 .. n, right after the end-of-text token and
inside ``vocab_size`` (they take the place of the last n merges). BPE never forms them from text; like the
end-of-text token, only the literal string ``<extra_id_i>`` in a text is read as the sentinel (as in Hugging
Face's T5 tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.errors import MoekitError
from moekit.lab.data.split import Piece

__all__ = ["EOT", "sentinel_token", "train_tokenizer", "load_tokenizer", "encode_pieces", "sentinel_ids"]

EOT = "<|endoftext|>"

# Byte-level BPE needs the 256 byte symbols and the end-of-text token before any merge or sentinel.
_BASE_VOCAB = 257


def sentinel_token(i: int) -> str:
    """The text of sentinel ``i`` (T5's spelling): ``<extra_id_{i}>``."""
    return f"<extra_id_{i}>"


def train_tokenizer(texts: list[str], vocab_size: int, *, sentinels: int = 0) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (the training split only, so validation text never shapes the
    merges).

    ``sentinels`` > 0 adds the special tokens ``<extra_id_0>`` ... ``<extra_id_{sentinels-1}>`` (T5 uses 100) with
    ids 1 .. ``sentinels``, counted inside ``vocab_size``; 0 (default) trains exactly the tokenizer without them.
    """
    if isinstance(sentinels, bool) or not isinstance(sentinels, int) or sentinels < 0:
        raise MoekitError(f"sentinels must be an integer >= 0, got {sentinels!r}")
    if sentinels and vocab_size < _BASE_VOCAB + sentinels:
        raise MoekitError(
            f"vocab_size={vocab_size} leaves no room for {sentinels} sentinels: it must be at least"
            f" {_BASE_VOCAB + sentinels} (256 bytes, end-of-text and the sentinels)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT] + [sentinel_token(i) for i in range(sentinels)],
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


def encode_pieces(tok: Tokenizer, pieces: list[Piece], *, eot_id: int | None = None) -> np.ndarray:
    """One int32 array: the pieces' ids in order, with an end-of-document id after each document's last piece:
    ``eot_id`` (an imported model's end-of-sequence), by default the tokenizer's ``<|endoftext|>``; a tokenizer
    without one concatenates the documents."""
    eot = tok.token_to_id(EOT) if eot_id is None else eot_id
    encodings = tok.encode_batch([text for _, text, _ in pieces], add_special_tokens=False)
    parts = []
    for (_, _, last), enc in zip(pieces, encodings, strict=True):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        if last and eot is not None:
            parts.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def sentinel_ids(tok: Tokenizer, n: int) -> list[int]:
    """The ids of ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` in order (sentinel i = ``sentinel_ids(tok, n)[i]``),
    for :class:`moekit.data.span_corruption.SpanCorruptionBatches`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MoekitError(f"n must be a positive integer, got {n!r}")
    ids = [tok.token_to_id(sentinel_token(i)) for i in range(n)]
    missing = [i for i, t in enumerate(ids) if t is None]
    if missing:
        raise MoekitError(
            f"the tokenizer has no sentinel {sentinel_token(missing[0])} ({len(missing)} of the {n} asked for"
            " missing); train it with train_tokenizer(..., sentinels=N) for N >= n"
        )
    return ids
