"""Where the time of one MoE layer step goes on CPU: a per-op profile of moekit's layer, transformers' Mixtral block
and the FLOP-matched dense FFN, and what it bounds.

Every variant does the same GEMM FLOPs per step (top-k experts of width d_ff per token, or one FFN of width
k * d_ff), and on CPU every one of them ends in the same kernel, ``aten::mm`` (torch's CPU ``_grouped_mm`` loops
over the groups). So the profile splits each step into its GEMM time and everything else, and the table shows the
bounds that follow:

- ``HF / 1.2``: the step time moekit would need to be 1.2x faster than transformers' block;
- ``dense GEMMs``: the GEMM time of the same FLOPs as a few large GEMMs, the best efficiency torch's CPU GEMMs reach
  at these sizes; grouped GEMMs over E experts (about k * S / E rows each) run at or below it;
- ``moe GEMMs``: moekit's own GEMM time, what is left when every other op costs nothing.

If ``HF / 1.2`` lies below both GEMM figures, no change outside the GEMM kernel can reach 1.2x. The variants run one
step each per round, interleaved over ``--rounds`` rounds after two warm-up steps each, in one process with one
thread unless ``--threads`` says more; the figures are medians over rounds of the profiler's self CPU time (so a
step's time here includes the profiler's own overhead per op, a few per cent for the many small ops of the grouped
paths). ``--allocator tuned`` (default) applies ``moekit.lab.runtime.tune_malloc`` first, as a tuned training run
does; ``default`` keeps glibc's settings. Writes ``layer_profile.{json,md}`` into ``--out`` (default
benchmarks/results).

    .venv/bin/python benchmarks/layer_profile.py [--experts 8 64] [--top-k 2] [--rounds 3] [--allocator tuned]
        [--threads 1] [--out benchmarks/results]
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
    script_meta,
)
from moekit.lab.bench.peers import hf_unavailable

RESULTS = Path(__file__).resolve().parent / "results"
# The matmuls that carry the FLOPs. The [S, 1, k] x [S, k, D] bmm that weights and sums the k expert outputs of a
# token is a weighted sum, not FLOP-heavy, and counts as other.
GEMM_OPS = ("aten::mm", "aten::addmm")
TOP_OTHER = 6  # non-GEMM ops listed per variant


def profile_step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds and call count per op of one forward + backward step."""
    from torch.profiler import ProfilerActivity, profile

    _zero(module, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(module, x, grad)
    return {e.key: (e.self_cpu_time_total / 1000.0, e.count) for e in prof.key_averages()}


def summarise(ops_per_round: list[dict[str, tuple[float, int]]]) -> dict:
    """Medians over rounds: the step's total, its GEMM time and calls, the rest (the difference of the two medians),
    and the costliest other ops (each op's median)."""
    totals = [sum(ms for ms, _ in ops.values()) for ops in ops_per_round]
    gemm = [sum(ops[k][0] for k in GEMM_OPS if k in ops) for ops in ops_per_round]
    calls = [sum(ops[k][1] for k in GEMM_OPS if k in ops) for ops in ops_per_round]
    names = {k for ops in ops_per_round for k in ops if k not in GEMM_OPS}
    other = {k: statistics.median(ops.get(k, (0.0, 0))[0] for ops in ops_per_round) for k in names}
    top = sorted(other.items(), key=lambda kv: -kv[1])[:TOP_OTHER]
    return {
        "total_ms": statistics.median(totals), "gemm_ms": statistics.median(gemm),
        "gemm_calls": int(statistics.median(calls)),
        # step minus GEMM of the medians, so that the three columns add up in the table
        "other_ms": statistics.median(totals) - statistics.median(gemm),
        "top_other": [[k, round(v, 2)] for k, v in top], "rounds_total_ms": [round(t, 1) for t in totals],
    }


def profile_case(case: Case, variants: list[str], rounds: int, warmup: int = 2) -> dict[str, dict]:
    """Profile every variant of one case, one step per variant per round, interleaved."""
    x, grad = make_inputs(case)
    modules = {v: build_variant(v, case) for v in variants}
    for _ in range(warmup):
        for m in modules.values():
            _zero(m, x)
            _step(m, x, grad)
    per_round: dict[str, list] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate so no variant always runs first
        for v in order:
            per_round[v].append(profile_step(modules[v], x, grad))
    return {v: summarise(per_round[v]) for v in variants}


def bounds(result: dict[str, dict]) -> dict[str, float]:
    """The three figures of the module docstring, in ms, plus the ratios they imply."""
    hf = [result[v]["total_ms"] for v in ("hf_grouped", "hf_eager") if v in result]
    out = {"moe_gemm_ms": result["moe"]["gemm_ms"], "dense_gemm_ms": result["dense"]["gemm_ms"],
           "moe_over_dense": result["moe"]["total_ms"] / result["dense"]["total_ms"]}
    if hf:
        out["hf_over_1_2_ms"] = min(hf) / 1.2
        out["best_hf_over_moe"] = min(hf) / result["moe"]["total_ms"]
        # The best ratio to transformers any change outside the GEMM kernel could give: moekit's step made of its
        # GEMMs alone, or of GEMMs as efficient as the dense FFN's plus the dense FFN's other ops.
        out["best_hf_over_moe_gemms_only"] = min(hf) / result["moe"]["gemm_ms"]
        out["best_hf_over_dense"] = min(hf) / result["dense"]["total_ms"]
    return out


def _short(op: str) -> str:
    return op.removeprefix("aten::").removeprefix("autograd::engine::evaluate_function: ")


def render(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Where an MoE layer step's CPU time goes (per-op profile)", "",
        f"{meta['tokens']} tokens, d_model {meta['d_model']}, d_ff {meta['d_ff']}, {meta['activation']}, float32, "
        f"{meta.get('threads', 1)} thread(s), allocator {meta['allocator']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, "
        f"{meta['machine']}, measured {meta['when']}, median of {meta['rounds']} interleaved rounds of one profiled "
        f"forward + backward step each. Command: `{meta['command']}`.", "",
        "Self CPU ms per step. *GEMM*: `aten::mm` and `aten::addmm`, where every variant's matmuls end on CPU. "
        "*HF / 1.2*: the step time moekit would need to be 1.2x faster than the faster transformers block; "
        "*HF / moe GEMMs*: the best ratio moekit could reach if nothing but its GEMMs took time; *HF / dense*: the "
        "ratio of a step as fast as the FLOP-matched dense FFN's.", "",
        "| E | k | variant | step | GEMM | GEMM calls | other | costliest other ops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for v, s in row["variants"].items():
            top = ", ".join(f"{_short(k)} {ms:.0f}" for k, ms in s["top_other"][:4])
            lines.append(f"| {row['experts']} | {row['top_k']} | {v} | {s['total_ms']:.0f} | {s['gemm_ms']:.0f} | "
                         f"{s['gemm_calls']} | {s['other_ms']:.0f} | {top} |")
    lines += ["",
              "| E | k | moe / dense | HF / moe | HF / 1.2 | moe GEMMs | dense GEMMs | HF / moe GEMMs | HF / dense |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        b = row["bounds"]
        hf = ("best_hf_over_moe" in b)
        lines.append(
            f"| {row['experts']} | {row['top_k']} | {b['moe_over_dense']:.2f} | "
            + (f"{b['best_hf_over_moe']:.2f} | {b['hf_over_1_2_ms']:.0f} | " if hf else "- | - | ")
            + f"{b['moe_gemm_ms']:.0f} | {b['dense_gemm_ms']:.0f} | "
            + (f"{b['best_hf_over_moe_gemms_only']:.2f} | {b['best_hf_over_dense']:.2f} |" if hf else "- | - |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--top-k", type=int, nargs="+", default=[2])
    p.add_argument("--activation", default="swiglu", choices=["swiglu", "geglu"])
    p.add_argument("--variants", nargs="+", default=["moe", "hf_grouped", "dense"],
                   choices=["moe", "hf_grouped", "hf_eager", "dense"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--allocator", default="tuned", choices=["tuned", "default"])
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1; with more, an op's self time is the wall time the calling "
                        "thread spends in it, the other threads' work included)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if "moe" not in args.variants or "dense" not in args.variants:
        p.error("--variants must include moe and dense (the bounds are theirs)")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.allocator == "tuned":
        from moekit.lab.runtime import tune_malloc

        if not tune_malloc():
            p.error("--allocator tuned: tune_malloc() could not tune this libc")
    torch.set_num_threads(args.threads)
    variants = list(args.variants)
    if hf_unavailable(args.activation) and any(v.startswith("hf_") for v in variants):
        print(f"transformers peers skipped: {hf_unavailable(args.activation)}", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("hf_")]
    rows = []
    for E in args.experts:
        for k in args.top_k:
            case = Case(num_experts=E, top_k=k, tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff,
                        activation=args.activation)
            check_agreement(case, tuple(v for v in variants if v.startswith("hf_")))  # raises if not equal
            result = profile_case(case, variants, args.rounds)
            rows.append({"experts": E, "top_k": k, "variants": result, "bounds": bounds(result)})
            print(E, k, {v: round(s["total_ms"]) for v, s in result.items()}, flush=True)
    meta = {"tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "activation": args.activation,
            "allocator": args.allocator, "rounds": args.rounds, "threads": args.threads,
            **script_meta("layer_profile.py", argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "layer_profile.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(args.out / "layer_profile.md", render(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
