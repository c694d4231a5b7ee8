"""``moekit generate RUN_DIR --prompt TEXT``: sample a continuation from a run's newest valid checkpoint."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run_dir", help="a run directory written by moekit train")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.errors import MoekitError
    from moekit.lab.data.tokenizer import load_tokenizer
    from moekit.lab.training.run import load_trained_run

    if args.max_new_tokens < 1:
        raise MoekitError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise MoekitError(f"--top-k must be >= 1, got {args.top_k}")
    if not args.prompt:
        raise MoekitError("--prompt must not be empty")

    def report(msg: str) -> None:
        print(f"moekit generate: warning: {msg}", file=sys.stderr)

    run = load_trained_run(args.run_dir, fallback=True, warn=report, command="generate")
    tok = load_tokenizer(run.data.tokenizer_path)
    gen = torch.Generator().manual_seed(args.seed)
    print(run.config.task.generate_text(
        run.model, tok, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        generator=gen,
    ))
    return 0
