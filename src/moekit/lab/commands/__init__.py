"""One module per ``moekit`` subcommand; each exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse


def add_overrides(p: argparse.ArgumentParser, help: str, metavar: str = "SECTION.KEY=VALUE") -> None:
    """The repeatable ``--set section.key=value`` option (parsed by ``run_config.parse_overrides``) into
    ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)
