"""One module per ``moekit`` subcommand; each exposes ``register(subparsers)``.

Process-wide settings are the command line's: ``moekit.lab.cli.main`` tunes glibc's malloc for the commands that
register :func:`add_tune_malloc`, and the commands that train apply the thread count of their config
(``moekit.lab.runtime.set_threads``)."""

from __future__ import annotations

import argparse


def add_overrides(p: argparse.ArgumentParser, help: str, metavar: str = "SECTION.KEY=VALUE") -> None:
    """The repeatable ``--set section.key=value`` option (parsed by ``run_config.parse_overrides``) into
    ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def add_tune_malloc(p: argparse.ArgumentParser) -> None:
    """``--no-tune-malloc``: keep glibc's default allocator settings. Without it ``moekit.lab.cli.main`` calls
    ``moekit.lab.runtime.tune_malloc()`` once before the command runs (``args.tune_malloc``; the outcome in
    ``args.malloc_tuned``)."""
    p.add_argument(
        "--no-tune-malloc", dest="tune_malloc", action="store_false",
        help="keep glibc's default allocator settings (by default large freed blocks are kept in the heap for "
        "reuse instead of being page-faulted in afresh every step; see moekit.lab.runtime.tune_malloc)",
    )
