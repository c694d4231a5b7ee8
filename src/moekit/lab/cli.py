"""The ``moekit`` command line. Thin on purpose: each subcommand lives in ``moekit.lab.commands.<name>`` and exposes
``register(subparsers)``; all knobs live in configs. Errors meant for the user exit non-zero with one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from moekit.errors import MoekitError

# Each module defines register(subparsers) -> None, which adds its parser and sets ``func`` (args -> int).
COMMAND_MODULES = [
    "moekit.lab.commands.bench",
    "moekit.lab.commands.train",
    "moekit.lab.commands.eval",
    "moekit.lab.commands.generate",
    "moekit.lab.commands.validate",
    "moekit.lab.commands.finetune",
    "moekit.lab.commands.data",
    "moekit.lab.commands.analyze",
    "moekit.lab.commands.distill",
    "moekit.lab.commands.compare",
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
