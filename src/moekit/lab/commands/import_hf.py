"""``moekit import-hf HF_DIR --out RUN_DIR``: a Hugging Face ``save_pretrained`` directory becomes a moekit run
directory (see :mod:`moekit.lab.interop`)."""

from __future__ import annotations

import argparse
import sys

from moekit.lab.commands import add_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="turn a Hugging Face checkpoint directory into a moekit run directory")
    p.add_argument("hf_dir", help="a save_pretrained directory: config.json, safetensors, tokenizer.json")
    p.add_argument("--out", required=True, help="the new run directory")
    add_overrides(p, "change [data] (e.g. data.corpus=sotu, data.seq_len=256) or [train] of the new run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.lab.interop import import_hf_run
    from moekit.lab.training.run_config import parse_overrides

    config = import_hf_run(
        args.hf_dir, args.out, parse_overrides(args.overrides), log=lambda msg: print(msg, file=sys.stderr)
    )
    kind, _ = config.task.describe(config)
    print(f"imported {args.hf_dir} ({kind}) into {args.out}")
    return 0
