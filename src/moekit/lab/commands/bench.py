"""``moekit bench``: MoE layer throughput against a FLOP-matched dense FFN, the peers' formulations and transformers'
Mixtral block. Results go to a new ``runs/bench-<UTC time>/`` folder unless ``--out`` names one."""

from __future__ import annotations

import argparse

from moekit.lab.commands import add_tune_malloc

# Names kept here so that building the parser imports no torch (tests check they match the bench module's).
VARIANTS = ("moe", "moe_cf1.25", "dense", "einsum", "loop", "hf_eager", "hf_grouped")
ACTIVATION_NAMES = ("relu", "gelu", "swiglu", "geglu", "gelu_tanh", "geglu_tanh")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="layer throughput vs dense FFN, one-hot einsum, per-expert loop and transformers' Mixtral block"
    )
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="numbers of experts E (default 8 64)")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="k values (default 1 2)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="time steps by the wall clock (default) or by this process's CPU time (needs --threads 1; time spent "
             "waiting for a core then does not count, cache contention still does)",
    )
    p.add_argument(
        "--activations", nargs="+", default=["swiglu", "geglu"], choices=ACTIVATION_NAMES,
        help="expert activations (default swiglu geglu; transformers' Mixtral block is a peer for the gated ones)",
    )
    p.add_argument(
        "--allocators", nargs="+", default=["default", "tuned"], choices=["default", "tuned"],
        help="glibc malloc settings, each case timed in its own fresh process (default: both)",
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                   help=f"what to time (default all: {' '.join(VARIANTS)})")
    p.add_argument("--slow-peers-max-experts", dest="slow_max_experts", type=int, default=None, metavar="N",
                   help="run the peers whose cost grows with E (hf_eager, loop, einsum) only up to N experts")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test on tiny sizes: checks that everything runs, measures nothing meaningful")
    # Kept for the command line's uniformity; the timings run in child processes set by --allocators.
    add_tune_malloc(p)
    p.add_argument(
        "--grad-policy", choices=("none", "reuse"), default="none",
        help="between steps: zero_grad(set_to_none=True) ('none', PyTorch's default) or reuse zeroed buffers",
    )
    p.add_argument("--out", default=None,
                   help="directory for the JSON and Markdown results (default: a new runs/bench-<UTC time>/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.lab.bench.layer import main_from_args

    if args.threads >= 1:  # main_from_args refuses the others
        torch.set_num_threads(args.threads)
    return main_from_args(args)
