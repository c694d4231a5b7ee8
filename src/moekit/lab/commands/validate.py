"""``moekit validate CONFIG``: check a run config strictly (the same checks ``moekit train`` runs first), and print
the model's size and cost. No data is read and nothing is trained."""

from __future__ import annotations

import argparse

from moekit.lab.commands import add_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a config file strictly, without training")
    p.add_argument("config", help="TOML config file or a name from configs/")
    add_overrides(p, "override one config value before checking (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.lab.training.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    kind, lines = cfg.task.describe(cfg)
    print(f"{args.config}: OK ({kind})")
    for line in lines:
        print(line)
    return 0
