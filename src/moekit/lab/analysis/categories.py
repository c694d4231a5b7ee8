"""Token categories for ST-MoE style specialisation analysis: which kind of token does each expert see?

ST-MoE (Zoph et al. 2022, Table 13) found encoder experts that specialise in punctuation, proper nouns, numbers and
sentinels. A small causal LM has no sentinels, so moekit checks the categories a byte-level BPE vocabulary makes
visible without a part-of-speech tagger. Every token gets exactly ONE category, by the first rule that matches (so
the categories partition the tokens and a contingency table of expert x category is well defined):

1. ``whitespace``   the token's text is only whitespace (spaces, newlines, tabs);
2. ``punctuation``  after stripping surrounding whitespace, only punctuation / symbol characters;
3. ``number``       after stripping whitespace, only digits and the separators ``.,`` with at least one digit;
4. ``continuation`` a word piece that continues a word: it does not start with whitespace (the byte-level space
                    marker "Ġ"), starts with a letter, and the previous token ended with a letter;
5. ``function``     a word from :data:`FUNCTION_WORDS` (case-insensitive);
6. ``capitalised``  a word starting with an uppercase letter (proper-noun-like; sentence starts land here too);
7. ``other``        everything else (mostly lowercase content words and their first pieces).

An encoder-decoder's span-corruption examples hold tokens no text has, so its analysis uses
:data:`SEQ2SEQ_CATEGORIES`, the seven plus two checked first: ``sentinel`` (``<extra_id_i>``, ST-MoE's sentinel
experts) and ``special`` (end-of-text, and the decoder's start token at position 0).

Token text is the tokenizer's piece mapped back from GPT-2's byte-to-unicode alphabet to real characters, so
"Ġthe" is " the" and "Ċ" is "\\n".
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

__all__ = [
    "CATEGORIES",
    "FUNCTION_WORDS",
    "SEQ2SEQ_CATEGORIES",
    "categorize",
    "categorize_special",
    "category_of",
    "piece_text",
]

CATEGORIES: tuple[str, ...] = (
    "whitespace",
    "punctuation",
    "number",
    "continuation",
    "function",
    "capitalised",
    "other",
)

# The encoder-decoder's categories: the text categories plus the tokens span corruption adds.
SEQ2SEQ_CATEGORIES: tuple[str, ...] = (*CATEGORIES, "sentinel", "special")

# Closed-class English words: articles, pronouns, prepositions, conjunctions, auxiliaries, common determiners.
# Fixed here (not learned) so results are comparable between runs.
FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    a an the this that these those some any each every no all both either neither
    i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
    who whom whose which what
    of in on at by for with to from into onto upon about above below over under between among through
    during before after since until against without within along across toward towards around near
    and or but nor so yet if then than because although though while whereas unless whether
    as not also too very
    is am are was were be been being have has had do does did shall will should would may might must can could
    there here
    """.split()
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    bytes_ = list(printable)
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in bytes_:
            bytes_.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bytes_, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()


def piece_text(piece: str) -> str:
    """The real text of a byte-level BPE piece ("Ġthe" -> " the"); pieces that are not valid UTF-8 on their own
    (half of a multi-byte character) are decoded with replacement characters."""
    try:
        raw = bytes(_BYTE_DECODER[ch] for ch in piece)
    except KeyError:  # not a byte-level piece (e.g. a special token): take it as text
        return piece
    return raw.decode("utf-8", errors="replace")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def category_of(text: str, previous: str | None) -> str:
    """The category of a token whose real text is ``text``; ``previous`` is the text of the token before it
    (None at the start of a sequence). See the module docstring for the rules."""
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if all(_is_punct(ch) for ch in stripped):
        return "punctuation"
    if any(ch.isdigit() for ch in stripped) and all(ch.isdigit() or ch in ".," for ch in stripped):
        return "number"
    starts_word = not text[0].isspace()
    if starts_word and text[0].isalpha() and previous and previous[-1:].isalpha():
        return "continuation"
    if stripped.lower() in FUNCTION_WORDS:
        return "function"
    if stripped[0].isupper():
        return "capitalised"
    return "other"


def categorize(texts: Sequence[str]) -> list[str]:
    """Categories of a token sequence, in order (each token's rule may look at the token before it)."""
    out: list[str] = []
    previous: str | None = None
    for text in texts:
        out.append(category_of(text, previous))
        previous = text
    return out


def categorize_special(
    texts: Sequence[str], token_ids: Sequence[int], sentinel_ids: set[int], special_ids: set[int],
    *, start_is_special: bool = False,
) -> list[str]:
    """:func:`categorize` for a span-corruption sequence (:data:`SEQ2SEQ_CATEGORIES`): a sentinel id is
    ``sentinel``, an id of ``special_ids`` (end-of-text) is ``special``, and so is the first position when
    ``start_is_special`` (the decoder's start token, whatever its id); the other tokens follow the text rules."""
    out = categorize(texts)
    for n, t in enumerate(token_ids):
        if t in sentinel_ids:
            out[n] = "sentinel"
        elif t in special_ids or (n == 0 and start_is_special):
            out[n] = "special"
    return out
