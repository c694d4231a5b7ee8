"""The ``moekit`` command line. Thin on purpose: each subcommand lives in ``moekit.commands.<name>`` and exposes
``register(subparsers)``; all knobs live in configs. Errors meant for the user exit non-zero with one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from moekit.errors import MoekitError

# Each module defines register(subparsers) -> None, which adds its parser and sets ``func`` (args -> int).
COMMAND_MODULES = [
    "moekit.commands.bench",
    "moekit.commands.train",
    "moekit.commands.eval",
    "moekit.commands.generate",
    "moekit.commands.validate",
    "moekit.commands.finetune",
    "moekit.commands.data",
    "moekit.commands.analyze",
    "moekit.commands.distill",
    "moekit.commands.compare",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MoekitError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, UnicodeDecodeError) as exc:
        print(f"moekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
