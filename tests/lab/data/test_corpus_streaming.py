"""Corpus files are read in chunks (issue 18): ``data.max_chars`` stops reading at that many characters, progress
is logged while reading, and below the limit the documents, pieces and tokens are exactly those of reading each
file whole (the errors for binary and non-UTF-8 files too, with the same byte offsets)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest

from moekit.errors import MoekitError
from moekit.lab.data import corpus
from moekit.lab.data.corpus import _decode, builtin_documents, load_corpus, path_documents
from moekit.lab.data.split import cut_pieces, split_pieces
from moekit.lab.data.tokenizer import encode_pieces, train_tokenizer

ALPHABET = "ab c\n  é☃日\t🙂"


def _whole_file_documents(path: Path) -> list[str]:
    """The reader before streaming: every file read and decoded whole, blank ones skipped."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    docs = [_decode(f.read_bytes(), str(f)) for f in files]
    return [d for d in docs if d.strip()]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few bytes, so that multi-byte characters and invalid bytes fall across chunk boundaries."""
    monkeypatch.setattr(corpus, "_CHUNK_BYTES", 7)
    monkeypatch.setattr(corpus, "_SNIFF_BYTES", 5)


def _random_corpus(root: Path, rng: random.Random) -> Path:
    root.mkdir()
    for i in range(rng.randint(1, 5)):
        kind = rng.random()
        if kind < 0.2:
            text = " \n\t " * rng.randint(0, 30)  # blank: skipped
        elif kind < 0.4:
            text = " " * rng.randint(1, 60) + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 80)))
        else:
            text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 400)))
        (root / f"f{i}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("seed", range(40))
def test_streamed_documents_cut_into_the_same_pieces_as_whole_files(tmp_path, small_chunks, seed):
    rng = random.Random(seed)
    root = _random_corpus(tmp_path / "c", rng)
    whole = _whole_file_documents(root)
    assert path_documents(root) == whole  # no limit: the very same documents
    for max_chars in (1, 3, 17, 50, 90, 333, 2000, None):
        docs = path_documents(root, max_chars=max_chars)
        assert cut_pieces(docs, 256, max_chars) == cut_pieces(whole, 256, max_chars), max_chars


def test_same_pieces_and_tokens_as_reading_whole_on_a_real_file(tmp_path, tiny_corpus):
    # The tiny training corpus, below and at a limit: the pieces, the tokenizer and the token ids are unchanged.
    for max_chars in (None, 20_000):
        old = cut_pieces(_whole_file_documents(tiny_corpus), 512, max_chars)
        new = cut_pieces(load_corpus(str(tiny_corpus), max_chars=max_chars), 512, max_chars)
        assert new == old
        train, val = split_pieces(new, 0.05)
        tok = train_tokenizer([t for _, t, _ in train], 300)
        old_train, _ = split_pieces(old, 0.05)
        old_tok = train_tokenizer([t for _, t, _ in old_train], 300)
        assert tok.to_str() == old_tok.to_str()
        np.testing.assert_array_equal(encode_pieces(tok, val), encode_pieces(old_tok, split_pieces(old, 0.05)[1]))


@pytest.mark.parametrize("seed", range(20))
def test_a_utf8_error_names_the_same_byte_as_a_whole_file_decode(tmp_path, small_chunks, seed):
    rng = random.Random(seed)
    good = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60))).encode()
    cut = rng.randint(0, len(good))
    bad = rng.choice([b"\xff", b"\xe2\x98", b"\xc3", b"\xe6\x97\x41", b"\x80"])
    data = good[:cut] + bad + good[cut:]
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        expected = f"corpus file {path} is not valid UTF-8 (byte {exc.start}); give UTF-8 text"
    else:
        pytest.skip("the bytes happen to be valid UTF-8")
    with pytest.raises(MoekitError) as info:
        path_documents(path)
    assert str(info.value) == expected


def test_binary_empty_and_latin1_files_keep_their_one_line_errors(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"text " * 10_000 + b"\x00")  # the NUL byte at 50,000: within the first 64 KiB
    with pytest.raises(MoekitError, match="looks binary"):
        load_corpus(str(binary), max_chars=10)  # judged on the first 64 KiB however few characters are kept
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n" * 100_000)
    with pytest.raises(MoekitError, match="is empty"):
        load_corpus(str(empty), max_chars=10)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(MoekitError, match=r"not valid UTF-8 \(byte 3\)"):
        load_corpus(str(latin1))


class _CountingFile(io.RawIOBase):
    """A binary file that counts the bytes handed out by ``read``."""

    def __init__(self, path: Path, counter: list[int]) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._counter = counter

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._counter[0] += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()
        super().close()


def test_max_chars_stops_reading_a_large_file(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    line = "the cat sat on the mat, naïvely ☃\n"
    big.write_text(line * (4 * 2**20 // len(line)), encoding="utf-8")  # about 4 MB
    read = [0]
    monkeypatch.setattr(corpus, "open", lambda path, mode="r": _CountingFile(path, read), raising=False)
    docs = load_corpus(str(big), max_chars=100_000)
    assert sum(len(d) for d in docs) == 100_000
    assert 100_000 <= read[0] < 100_000 + 70_000  # a first 64 KiB sniff at most beyond the limit, not 4 MB
    # and the same pieces as cutting the whole file
    assert cut_pieces(docs, 4096, 100_000) == cut_pieces([big.read_text(encoding="utf-8")], 4096, 100_000)


def test_progress_lines_while_reading_a_multi_megabyte_corpus(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("x" * (3 * 2**20 - 1) + "\n", encoding="utf-8")  # one file of 3 MB
    (root / "b.txt").write_text("y" * (2**20 - 1) + "\n", encoding="utf-8")  # and one of 1 MB
    lines: list[str] = []
    docs = load_corpus(str(root), log=lines.append, progress_bytes=2**20 // 2)
    assert len(docs) == 2
    assert lines == [f"reading corpus {root}: {mb / 2:.1f} of 4.0 MB" for mb in range(1, 9)]
    silent = load_corpus(str(root))  # no log: the same documents
    assert silent == docs


def test_the_builtin_corpus_stops_parsing_at_max_chars():
    docs = builtin_documents(max_chars=5_000)
    assert 5_000 <= sum(len(d) for d in docs) < 200_000  # a few files' docstrings, not two million characters
    # A longer read starts with the same documents (parsing the whole corpus is too slow for a unit test).
    more = builtin_documents(max_chars=50_000)
    assert more[: len(docs)] == docs and len(more) > len(docs)
    assert cut_pieces(docs, 1024, 5_000) == cut_pieces(more, 1024, 5_000)
