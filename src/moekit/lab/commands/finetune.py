"""``moekit finetune``: parameter-efficient MoE (MoV / MoLoRA) and baselines on a frozen pretrained
encoder."""

from __future__ import annotations

import argparse
import json

from moekit.lab.commands import add_tune_malloc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune",
                       help="multitask MoV / MoLoRA / (IA)3 / LoRA / full fine-tuning of an encoder")
    p.add_argument("--method", "--adapter", dest="method", default="mov",
                   choices=["ia3", "lora", "mov", "molora", "full", "frozen"])
    p.add_argument("--model", default=None,
                   help="local Hugging Face encoder dir (default: packaged MiniLM-L6)")
    p.add_argument("--experts", type=int, default=10, help="MoV / MoLoRA experts (default 10)")
    p.add_argument("--routing", default="soft", choices=["soft", "topk"])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router-input", default="token", choices=["token", "sentence"])
    p.add_argument("--r", type=int, default=4, help="LoRA / MoLoRA rank")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default depends on the method")
    p.add_argument("--max-len", type=int, default=64, help="training query length in tokens")
    p.add_argument("--eval-max-len", type=int, default=128, help="held-out task query length")
    p.add_argument("--n-train", type=int, default=1000, help="training examples kept per seen task")
    p.add_argument("--n-test", type=int, default=100, help="test examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/finetune", help="output dir (one run) or grid dir (--grid)")
    p.add_argument("--grid", action="store_true",
                   help="run the whole comparison grid of docs/RESULTS.md into --out (resumable)")
    p.add_argument("--only", nargs="+", default=None, help="with --grid: just these grid entries")
    p.add_argument("--report", default=None, metavar="GRID_DIR",
                   help="print the Markdown table of a grid dir (and --plot the routing of its MoV run)")
    p.add_argument("--plot", default=None, help="with --report: PNG path for the routing heatmaps")
    p.add_argument("--plot-run", default="mov10", help="with --plot: which run's routing to draw")
    add_tune_malloc(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.errors import MoekitError
    from moekit.lab.adapters import experiments
    from moekit.lab.adapters.finetune import FinetuneConfig, run_finetune
    from moekit.lab.runtime import set_threads

    if args.report:
        results = experiments.load_results(args.report)
        majority = experiments.majority_baseline(results[0]) if results else None
        print(experiments.results_table(results, majority))
        if args.plot:
            chosen = [r for r in results if r["name"] == args.plot_run and "routing" in r]
            if not chosen:
                raise MoekitError(f"no finished run named {args.plot_run!r} with routing records "
                                  f"in {args.report}")
            print(f"\nrouting plot: {experiments.plot_routing(chosen[0], args.plot)}")
        return 0
    base = dict(model_path=args.model, num_experts=args.experts, routing=args.routing, top_k=args.top_k,
                router_input=args.router_input, r=args.r, alpha=args.alpha, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, max_len=args.max_len, eval_max_len=args.eval_max_len,
                n_train=args.n_train, n_test=args.n_test, seed=args.seed, threads=args.threads)
    set_threads(args.threads)  # every run of this process (a grid too) uses --threads
    if args.grid:
        for k in ("num_experts", "routing", "top_k", "router_input"):
            base.pop(k)  # the grid sets these per entry
        results = experiments.run_grid(args.out, base, args.only)
        print(experiments.results_table(results))
        return 0
    res = run_finetune(FinetuneConfig(method=args.method, **base), args.out)
    keys = ("name", "trainable_params", "trainable_fraction", "seen_mean", "heldout_mean", "accuracy",
            "train_time_s", "total_time_s")
    summary = {k: res[k] for k in keys}
    print(json.dumps(summary, indent=1))
    return 0
