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
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--schedule", default="linear", choices=["linear", "constant", "cosine"],
                   help="after the warm-up: linear or cosine decay to 0, or constant (default linear)")
    p.add_argument("--max-len", type=int, default=64, help="training query length in tokens")
    p.add_argument("--eval-max-len", type=int, default=128, help="held-out task query length")
    p.add_argument("--n-train", type=int, default=1000, help="training examples kept per seen task")
    p.add_argument("--n-test", type=int, default=100, help="test examples per task")
    p.add_argument("--n-dev", type=int, default=0,
                   help="development examples per seen task, carved from the training keys (default 0: none)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="score the dev split every N steps (learning curve; needs --n-dev)")
    p.add_argument("--splits", default="test",
                   help="splits scored at the end, comma-separated: dev, test (default test); each writes "
                        "predictions_<split>.jsonl")
    p.add_argument("--mixture", default="classification", choices=["classification", "transfer"],
                   help="seen / held-out tasks: classification (the first grid's) or transfer (VitaminC trained "
                        "on, the NLI cluster held out)")
    p.add_argument("--seen", default=None, help="comma-separated seen tasks (overrides --mixture)")
    p.add_argument("--heldout", default=None, help="comma-separated held-out tasks (overrides --mixture)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not calibrate held-out scoring against content-free inputs")
    p.add_argument("--probe", action="store_true",
                   help="with --method frozen: also a linear probe per seen task on the frozen encoder")
    p.add_argument("--n-probe", type=int, default=500, help="training examples per task for --probe")
    p.add_argument("--routing-items", type=int, default=100,
                   help="test examples per seen task for routing specialisation (MoV / MoLoRA; 0: skip)")
    p.add_argument("--offline", action="store_true",
                   help="refuse tasks whose source is not in the local cache instead of downloading it")
    p.add_argument("--drop-preamble", action="store_true",
                   help="drop a preamble shared by every input of a task (BIG-bench inputs can carry one)")
    p.add_argument("--save-trainable", action="store_true",
                   help="keep the trained tensors (trainable.safetensors) for --evaluate")
    p.add_argument("--evaluate", default=None, metavar="RUN_DIR",
                   help="score --splits of a finished run from its saved tensors and exit")
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
    from moekit.lab.adapters.finetune import FinetuneConfig, evaluate_run, run_finetune
    from moekit.lab.adapters.tasks import MIXTURES
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
    splits = [x for x in args.splits.split(",") if x]
    set_threads(args.threads)  # every run of this process (a grid too) uses --threads
    if args.evaluate:
        res = evaluate_run(args.evaluate, splits)
        print(json.dumps({k: res.get(k) for k in ("name", "seen_mean", "heldout_mean",
                                                   "heldout_calibrated_balanced_mean")}, indent=1))
        return 0
    seen, heldout = MIXTURES[args.mixture]
    seen = args.seen.split(",") if args.seen else list(seen)
    heldout = [x for x in args.heldout.split(",") if x] if args.heldout is not None else list(heldout)
    base = dict(model_path=args.model, num_experts=args.experts, routing=args.routing, top_k=args.top_k,
                router_input=args.router_input, r=args.r, alpha=args.alpha, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
                max_len=args.max_len, eval_max_len=args.eval_max_len, n_train=args.n_train, n_test=args.n_test,
                n_dev=args.n_dev, eval_every=args.eval_every, splits=splits, calibrate=not args.no_calibrate,
                probe=args.probe, n_probe=args.n_probe, routing_items=args.routing_items, offline=args.offline,
                save_trainable=args.save_trainable, drop_preamble=args.drop_preamble, seed=args.seed,
                threads=args.threads, seen_tasks=seen,
                heldout_tasks=heldout)
    if args.grid:
        for k in ("num_experts", "routing", "top_k", "router_input"):
            base.pop(k)  # the grid sets these per entry
        results = experiments.run_grid(args.out, base, args.only)
        print(experiments.results_table(results))
        return 0
    res = run_finetune(FinetuneConfig(method=args.method, **base), args.out)
    keys = ("name", "trainable_params", "trainable_fraction", "seen_mean", "heldout_mean",
            "heldout_calibrated_balanced_mean", "accuracy", "train_time_s", "total_time_s")
    summary = {k: res.get(k) for k in keys}
    print(json.dumps(summary, indent=1))
    return 0
