"""``moekit export-hf RUN_DIR --out HF_DIR``: write a run's newest valid weights as a Hugging Face checkpoint
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads (see :mod:`moekit.lab.interop`)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a run's model as a Hugging Face checkpoint directory")
    p.add_argument("run_dir", help="a moekit run directory (trained, imported or upcycled)")
    p.add_argument("--out", required=True, help="the new Hugging Face directory")
    p.add_argument("--model-type", default=None,
                   help="the family to write (default: the first that represents the model exactly)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.lab.interop import export_hf_run

    def warn(msg: str) -> None:
        print(f"moekit export-hf: warning: {msg}", file=sys.stderr)

    model_type = export_hf_run(args.run_dir, args.out, model_type=args.model_type, warn=warn)
    print(f"wrote {args.out} ({model_type})")
    return 0
