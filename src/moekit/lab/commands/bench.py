"""``moekit bench``: MoE layer throughput against a FLOP-matched dense FFN and the peers' formulations."""

from __future__ import annotations

import argparse

from moekit.lab.commands import add_tune_malloc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="layer throughput vs dense FFN, one-hot einsum and per-expert loop")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="numbers of experts E (default 8 64)")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="k values (default 1 2)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per case (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a small, fast configuration (smoke test)")
    add_tune_malloc(p)  # applied for all variants alike
    p.add_argument(
        "--grad-policy", choices=("none", "reuse"), default="none",
        help="between steps: zero_grad(set_to_none=True) ('none', PyTorch's default) or reuse zeroed buffers",
    )
    p.add_argument("--out", default=None, help="directory for the JSON and Markdown results")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.lab.bench.layer import main_from_args

    if args.threads >= 1:  # main_from_args refuses the others
        torch.set_num_threads(args.threads)
    return main_from_args(args)
