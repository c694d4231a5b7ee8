"""``moekit compare CONFIG...``: train several configs on the same data, token budget and seeds, and write a
table (CSV + Markdown), ``compare.json`` and a validation-loss plot. Thin: the logic is in
``moekit.lab.training.compare``. Rerunning with the same ``--out`` skips finished runs and resumes interrupted ones."""

from __future__ import annotations

import argparse
import sys

from moekit.lab.commands import add_overrides, add_tune_malloc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="train several configs on the same data and seeds; table and plot of what sparsity buys"
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="TOML config files or names from configs/")
    p.add_argument(
        "--seeds", type=int, default=1, help="seeds per config: train.seed + 0 .. N-1 (default 1)"
    )
    add_overrides(p, "override one value in every config (repeatable), e.g. --set train.threads=1")
    p.add_argument(
        "--out", default=None, help="output directory (default runs/compare-<time>); reuse it to resume"
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="NAME",
        help="config (file stem) whose final validation loss the speedups are measured to (default: the first "
        "config without a [moe] section; none: no speedup columns)",
    )
    add_tune_malloc(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.lab.runtime import train_run_with_threads
    from moekit.lab.training.compare import compare

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = compare(
        args.configs,
        seeds=args.seeds,
        overrides=args.overrides,
        out_dir=args.out,
        baseline=args.baseline,
        log=log,
        train=train_run_with_threads,  # each run's train.threads applies to this process while it trains
    )
    print((result.out_dir / "compare.md").read_text(encoding="utf-8"), end="")
    print(f"trained {len(result.trained)} run(s), skipped {len(result.skipped)} finished earlier")
    for path in result.files:
        print(f"wrote {path}")
    return 0
