"""Sentinel tokens for span corruption: ``train_tokenizer(..., sentinels=n)`` adds ``<extra_id_0>`` ...
``<extra_id_{n-1}>`` inside the vocabulary, ordinary text never encodes to them, ``sentinel_ids`` finds them, and
the default tokenizer is unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moekit.data.span_corruption import SpanCorruptionBatches, SpanCorruptionEvalData
from moekit.errors import MoekitError
from moekit.lab.data.split import cut_pieces
from moekit.lab.data.tokenizer import EOT, encode_pieces, sentinel_ids, sentinel_token, train_tokenizer

TEXT = (
    "Return the number of items in a container.\n\nRaise ValueError when the value is out of range.\n"
    "Unicode: naïve café — ∑ x² ☃ 日本語\tand tabs, trailing spaces   \n"
    "Markup-like text: <extra_id> extra_id_0 <extra-id-1> <extra_id_x> <|endoftext| <<>> [MASK]\n"
) * 20


def test_default_tokenizer_has_no_sentinels_and_is_unchanged():
    default = train_tokenizer([TEXT], vocab_size=320)
    assert default.to_str() == train_tokenizer([TEXT], vocab_size=320, sentinels=0).to_str()
    added = json.loads(default.to_str())["added_tokens"]
    assert [(t["id"], t["content"]) for t in added] == [(0, EOT)]  # only the end-of-text token is special
    with pytest.raises(MoekitError, match="no sentinel <extra_id_0>"):
        sentinel_ids(default, 1)


def test_sentinels_take_ids_after_end_of_text_inside_vocab_size():
    tok = train_tokenizer([TEXT], vocab_size=400, sentinels=100)
    assert tok.get_vocab_size() <= 400 and tok.token_to_id(EOT) == 0
    ids = sentinel_ids(tok, 100)
    assert ids == list(range(1, 101))
    assert sentinel_ids(tok, 3) == [1, 2, 3]
    for i in (0, 7, 99):  # round trip: id -> text -> id
        assert tok.id_to_token(ids[i]) == sentinel_token(i) == f"<extra_id_{i}>"
        assert tok.encode(sentinel_token(i), add_special_tokens=False).ids == [ids[i]]
        assert tok.decode([ids[i]], skip_special_tokens=False) == sentinel_token(i)
    with pytest.raises(MoekitError, match="no sentinel <extra_id_100>"):
        sentinel_ids(tok, 101)
    with pytest.raises(MoekitError, match="n must be a positive integer"):
        sentinel_ids(tok, 0)


def test_ordinary_text_never_encodes_to_a_sentinel():
    tok = train_tokenizer([TEXT], vocab_size=400, sentinels=100)
    sentinels = set(sentinel_ids(tok, 100))
    for s in (TEXT, "never seen: Ωμέγα 🙂 \x01\r\n", "<extra_id_100> <extra_id_-1> <EXTRA_ID_0>", "", "   "):
        ids = tok.encode(s, add_special_tokens=False).ids
        assert not sentinels & set(ids)
        assert tok.decode(ids) == s  # ordinary text still round-trips
    # The sentinels take the place of the last merges: the same merges as a plain tokenizer 100 tokens smaller.
    plain = json.loads(train_tokenizer([TEXT], vocab_size=300).to_str())["model"]["merges"]
    assert json.loads(tok.to_str())["model"]["merges"] == plain and len(plain) == 300 - 257


def test_sentinels_need_room_in_the_vocabulary():
    with pytest.raises(MoekitError, match="at least 357"):
        train_tokenizer([TEXT], vocab_size=356, sentinels=100)
    with pytest.raises(MoekitError, match="sentinels must be an integer >= 0"):
        train_tokenizer([TEXT], vocab_size=400, sentinels=-1)


def test_span_corruption_batches_from_a_sentinel_tokenizer():
    tok = train_tokenizer([TEXT], vocab_size=400, sentinels=100)
    tokens = encode_pieces(tok, cut_pieces([TEXT * 10, TEXT * 5], piece_chars=1024))
    ids = sentinel_ids(tok, 100)
    eos = tok.token_to_id(EOT)
    batches = SpanCorruptionBatches(tokens, 4, 64, 0, ids, eos)
    inputs, labels = batches.next_batch()
    assert inputs.shape == (4, 64) and int(labels[0, 0]) == ids[0]
    assert int(inputs[0, -1]) == eos and int(labels[0, -1]) == eos
    # the decoded target starts with the first sentinel's text
    assert tok.decode(labels[0].tolist(), skip_special_tokens=False).startswith(sentinel_token(0))
    ev = SpanCorruptionEvalData(tokens, 64, ids, eos)
    assert sum(b.inputs.shape[0] for b in ev.batches(8, None)) == ev.num_windows
    # A token array that holds a sentinel (a corpus quoting "<extra_id_3>") is refused, not trained on.
    quoted = np.concatenate([tokens, np.asarray(tok.encode("see <extra_id_3>").ids, dtype=tokens.dtype)])
    with pytest.raises(MoekitError, match=r"contain sentinel ids \[4\]"):
        SpanCorruptionBatches(quoted, 4, 64, 0, ids, eos)
