"""The ``moekit`` command line. Thin on purpose: each subcommand lives in ``moekit.lab.commands.<name>`` and exposes
``register(subparsers)``; all knobs live in configs. Errors meant for the user (:class:`~moekit.errors.MoekitError`,
its :class:`~moekit.errors.ConfigError`, and the operating system's refusals to open a path the user named) exit
with status 2 and one line; any other exception is a bug and keeps its traceback.

Process-wide settings are applied here and in the command entries, never by a library function: glibc's malloc
tuning once, below, for the commands that offer ``--no-tune-malloc`` (train, compare, finetune, bench), with a
thread that trims the heap's free pages every few seconds (not under bench); the thread
count of the config by the commands that train (``moekit.lab.runtime.set_threads``). Plots use matplotlib's object
API, so no backend is selected anywhere."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moekit.errors import MoekitError
from moekit.lab.runtime import trim_heap_every, tune_malloc

# What a user can cause: a bad config or argument (ConfigError is a MoekitError), a missing or unreadable file.
# A plain ValueError is not here: library code raises it for programming errors, which must keep their traceback.
USER_ERRORS = (MoekitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               UnicodeDecodeError)

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
    "moekit.lab.commands.import_hf",
    "moekit.lab.commands.export_hf",
    "moekit.lab.commands.upcycle",
    "moekit.lab.commands.finetune_seq2seq",
]


def build_parser() -> argparse.ArgumentParser:
    from moekit import __version__

    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit for PyTorch.")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "tune_malloc"):  # a command that registered --no-tune-malloc
            args.malloc_tuned = tune_malloc() if args.tune_malloc else False
            if args.malloc_tuned and args.command != "bench":
                # Tuned, glibc's heap fragments and grows step after step; trimming its free pages now and then
                # keeps resident memory flat (moekit.lab.runtime). Not under bench: a trim inside a timed loop
                # would be measured.
                trim_heap_every()
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"moekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The process entry point (the ``moekit`` script, ``python -m moekit``, ``torchrun -m moekit``): run
    :func:`main` and exit with its status.

    A process that torchrun started (``WORLD_SIZE`` > 1) leaves with ``os._exit`` once its output is flushed: the
    command has closed every file it wrote and destroyed its process group, and the normal exit path through
    interpreter finalisation tears gloo's C++ threads down in no fixed order, which has aborted (SIGABRT) a rank
    whose work was done. In-process callers of :func:`main` (tests) are unaffected."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
