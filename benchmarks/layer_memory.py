"""Peak memory of one forward + backward of moekit's MoE layer against transformers' Mixtral block.

Two measures per variant, both of the memory a training step adds on top of the weights (the gradients are set to
None before the step, as ``zero_grad()`` does by default):

- **live tensors**: the largest total size of tensors alive at once during the step, from the PyTorch profiler's
  memory timeline (allocator level). It depends only on the code path and the shapes, not on the machine, the
  allocator or the load, so a difference of one tensor shows;
- **RSS**: growth of the resident set's high-water mark (``VmHWM``) over two steps in a fresh process with glibc's
  default allocator, the median over ``--rss-repeats`` processes (moekit.lab.bench.layer.measure_peak). This is what
  the operating system sees, allocator caching included, and it varies by some tens of MB between processes.

Variants are built as ``moekit bench`` builds them, from the same weights: ``moe`` (moekit, dropless),
``hf_grouped`` / ``hf_eager`` (transformers' ``MixtralSparseMoeBlock`` with its grouped-GEMM or per-expert-loop
experts, checked equal to moekit's output first) and ``dense`` (the FFN with the same active FLOPs). Writes
``benchmarks/results/layer_memory.{json,md}``.

    .venv/bin/python benchmarks/layer_memory.py [--experts 8 64] [--top-k 1 2] [--rss-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from moekit.atomic import atomic_write_text
from moekit.lab.bench.layer import (
    Case,
    _step,
    _zero,
    build_variant,
    check_agreement,
    make_inputs,
    measure_peak,
    script_meta,
)
from moekit.lab.bench.peers import hf_unavailable

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


def live_peak_mib(variant: str, case: Case) -> float:
    """Peak bytes of tensors created and alive at once during one step (after a warm-up step), from the profiler's
    memory timeline; tensors that existed before the step (weights, inputs) are not counted."""
    from torch.profiler import ProfilerActivity, profile

    x, grad = make_inputs(case)
    module = build_variant(variant, case)
    _zero(module, x)
    _step(module, x, grad)
    _zero(module, x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        _step(module, x, grad)
    # The timeline behind Profiler.export_memory_timeline: (time, action, (storage, version), bytes).
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak / MIB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--activations", nargs="+", default=["swiglu"], choices=["swiglu", "geglu"])
    p.add_argument("--variants", nargs="+", default=["moe", "hf_grouped", "hf_eager", "dense"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--rss-repeats", type=int, default=3, help="fresh processes per RSS figure (0: skip RSS)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    variants = list(args.variants)
    if any(hf_unavailable(a) for a in args.activations) and any(v.startswith("hf_") for v in variants):
        why = next(hf_unavailable(a) for a in args.activations if hf_unavailable(a))
        print(f"transformers peers skipped: {why}", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("hf_")]
    rows = []
    for act in args.activations:
        for E in args.experts:
            for k in args.top_k:
                case = Case(num_experts=E, top_k=k, tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff,
                            activation=act)
                check_agreement(case, tuple(v for v in variants if v.startswith("hf_")))  # raises if not equal
                row = {"activation": act, "experts": E, "top_k": k, "live_mib": {}, "rss_mib": {}}
                for v in variants:
                    row["live_mib"][v] = round(live_peak_mib(v, case), 1)
                    if args.rss_repeats > 0:
                        rss = [measure_peak(v, case, 1, tuned=False) for _ in range(args.rss_repeats)]
                        row["rss_mib"][v] = {"median": round(statistics.median(rss), 1),
                                             "all": [round(r, 1) for r in rss]}
                    print(act, E, k, v, row["live_mib"][v], row["rss_mib"].get(v, ""), flush=True)
                rows.append(row)
    meta = {"tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "dtype": "float32",
            **script_meta("layer_memory.py", argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "layer_memory.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(args.out / "layer_memory.md", render(meta, rows, variants))
    return 0


def render(meta: dict, rows: list[dict], variants: list[str]) -> str:
    best_hf = [v for v in variants if v.startswith("hf_")]
    lines = [
        "# MoE layer peak memory (one forward + backward)", "",
        f"{meta['tokens']} tokens, d_model {meta['d_model']}, d_ff {meta['d_ff']}, {meta['dtype']}, torch "
        f"{meta['torch']}, transformers {meta['transformers']}, measured {meta['when']}. Command: "
        f"`{meta['command'].strip()}`.", "",
        "MiB added by one training step on top of the weights and inputs (gradients set to None before it). *live*: "
        "the largest total of tensors alive at once, from the profiler's memory timeline (exact, the same on any "
        "machine); *RSS*: growth of the resident high-water mark over two steps in a fresh process with glibc's "
        "default allocator, median of fresh processes (what the OS sees; varies by tens of MiB). `moe / HF`: moekit's "
        "live peak over the lower of the transformers blocks' (below 1: moekit needs less).", "",
        "| act | E | k | " + " | ".join(f"{v} live" for v in variants) + " | moe / HF live | "
        + " | ".join(f"{v} RSS" for v in variants) + " |",
        "|---|---|---|" + "---|" * (2 * len(variants) + 1),
    ]
    for r in rows:
        live, rss = r["live_mib"], r["rss_mib"]
        ratio = (f"{live['moe'] / min(live[v] for v in best_hf):.3f}" if best_hf and "moe" in live else "-")
        lines.append(
            f"| {r['activation']} | {r['experts']} | {r['top_k']} | "
            + " | ".join(f"{live[v]:.1f}" for v in variants) + f" | {ratio} | "
            + " | ".join(f"{rss[v]['median']:.1f}" if v in rss else "-" for v in variants) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
