"""Token category rules on hand-made inputs."""

from __future__ import annotations

from moekit.lab.analysis.categories import categorize, piece_text


def test_piece_text_undoes_byte_level_mapping():
    assert piece_text("Ġthe") == " the"
    assert piece_text("Ċ") == "\n"
    assert piece_text("ĠĠ") == "  "
    assert piece_text("Ã©") == "é"  # the two UTF-8 bytes of é


def test_categories_of_a_hand_made_token_list():
    pieces = ["ĠThe", "Ġpresident", "ial", ",", "Ġ1990", "Ġof", "Ċ", "ĠWashington", "Ġbudget", "s", "Ġ$", "2,000"]
    cats = categorize([piece_text(p) for p in pieces])
    assert cats == [
        "function",  # " The": a function word (the rule comes before capitalised)
        "other",  # " president": lowercase content word
        "continuation",  # "ial": no leading space, follows a word ending in a letter
        "punctuation",
        "number",
        "function",
        "whitespace",
        "capitalised",
        "other",
        "continuation",
        "punctuation",  # " $" is a symbol
        "number",  # digits with a thousands comma
    ]
    # A word piece at the start of a window, or after punctuation, is not a continuation.
    assert categorize(["ing"]) == ["other"]
    assert categorize([",", "ing"]) == ["punctuation", "other"]
