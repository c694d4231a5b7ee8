"""``moekit validate CONFIG``: check a run config strictly (the same checks ``moekit train`` runs first), that its
data source exists, and that training it fits in this machine's memory; print the model's size, cost and memory
estimate, and warnings for settings that are valid but probably not meant (warm-up longer than the run). No data is
read and nothing is trained."""

from __future__ import annotations

import argparse
import sys

from moekit.lab.commands import add_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a config file strictly, without training")
    p.add_argument("config", help="TOML config file or a name from configs/")
    add_overrides(p, "override one config value before checking (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.config import ConfigProblems
    from moekit.lab.training.run_config import load_run_config
    from moekit.lab.training.size import available_memory, estimate_training_memory, format_bytes, memory_problem

    cfg = load_run_config(args.config, args.overrides)
    for warning in cfg.warnings():
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    available = available_memory()
    # Both checked, so one run names both: the data source (a corpus path that does not exist) and the memory.
    problems = [p for p in (cfg.data.source_problem(), memory_problem(cfg, available)) if p is not None]
    if problems:
        raise ConfigProblems(problems)
    kind, lines = cfg.task.describe(cfg)
    print(f"{args.config}: OK ({kind})")
    for line in lines:
        print(line)
    estimate = estimate_training_memory(cfg)
    room = "" if available is None else f"; {format_bytes(available)} available"
    print(f"memory to train: about {format_bytes(estimate.total)} ({estimate.breakdown()}){room}")
    return 0
