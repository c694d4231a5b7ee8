"""A fixed train / validation split: documents are cut into pieces, and evenly spaced pieces are held out.

Spreading the held-out pieces evenly (piece i is held out when ``floor((i + 1) f) > floor(i f)``) keeps the
validation text from the same mix of sources as training, and depends on nothing but the corpus and ``f``.
"""

from __future__ import annotations

import math

from moekit.errors import MoekitError

__all__ = ["Piece", "cut_pieces", "split_pieces"]

# (document index, text, is the document's last piece)
Piece = tuple[int, str, bool]


def cut_pieces(docs: list[str], piece_chars: int, max_chars: int | None = None) -> list[Piece]:
    """Cut each document into pieces of at most ~``piece_chars`` characters, at a line break when one is
    near."""
    pieces: list[Piece] = []
    budget = max_chars if max_chars is not None else math.inf
    for d, doc in enumerate(docs):
        if budget <= 0:
            break
        if len(doc) > budget:
            doc = doc[: int(budget)]
        budget -= len(doc)
        start = 0
        while start < len(doc):
            end = min(len(doc), start + piece_chars)
            if end < len(doc):
                cut = doc.rfind("\n", start + piece_chars // 2, end)
                end = cut + 1 if cut != -1 else end
            pieces.append((d, doc[start:end], end >= len(doc)))
            start = end
    return pieces


def split_pieces(pieces: list[Piece], val_fraction: float) -> tuple[list[Piece], list[Piece]]:
    """``(train, val)``: every piece whose index crosses a multiple of ``1 / val_fraction`` is held out."""
    if len(pieces) < 2:
        raise MoekitError(
            f"the corpus is too small to hold out a validation split ({len(pieces)} piece); give more text"
            " or lower data.piece_chars"
        )
    train, val = [], []
    for i, piece in enumerate(pieces):
        held_out = math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
        (val if held_out else train).append(piece)
    if not val:  # fewer pieces than 1 / val_fraction: hold out the last one
        val.append(train.pop())
    return train, val
