"""ST-MoE section 7 at small scale: do encoder experts specialise by token category more than decoder experts?

Runs ``moekit analyze`` (``moekit.lab.analysis.analyze_run``) on the sparse encoder-decoder runs that
``benchmarks/repro/seq2seq_pretraining.py`` trained (switch-t5-tiny and stmoe-t5-tiny, one run per seed) and
reads, per stack, the mutual information between a token's category and its top-1 expert for the trained model and
two null models: the untrained model (its config and seed before any step) and a random token-to-expert hash that
keeps the trained layer's loads. A router only "specialises" as far as it beats those: label shuffling alone tests
independence, which any embedding-driven router (and the hash) beats.

Per run and stack the figure is the excess over the hash, as a share of the category entropy so that the two stacks
(whose token mixes differ: the decoder sees sentinels and the masked spans) are on one scale:

    excess = (MI_trained - MI_hash) / H(category)

ST-MoE's claim is that encoder experts specialise and decoder experts do not, so the paired difference
``excess_encoder - excess_decoder`` should be positive; also reported: each stack's excess alone and the trained
model's gain over its untrained self. Seeds are paired (the same run gives both stacks). 95 % t intervals; a
direction is "reproduced" when the interval excludes zero on the paper's side, "contradicted" on the other side,
otherwise "not resolved at this scale".

    .venv/bin/python benchmarks/repro/seq2seq_specialisation.py --runs /tmp/s2s-pretraining-runs \
        --out docs/results/seq2seq_specialisation
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval  # noqa: E402  (the shared t interval)

ARMS = ("switch", "stmoe")


def verdict(mean: float, half: float, paper_sign: int) -> str:
    if math.isnan(half):
        return "not resolved at this scale"
    lo, hi = mean - half, mean + half
    if (lo > 0 and paper_sign > 0) or (hi < 0 and paper_sign < 0):
        return "reproduced"
    if (hi < 0 and paper_sign > 0) or (lo > 0 and paper_sign < 0):
        return "contradicted"
    return "not resolved at this scale"


def analyse(runs: Path, max_tokens: int, hash_draws: int) -> list[dict]:
    from moekit.lab.analysis import analyze_run

    rows = []
    for seed_dir in sorted(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("seed")):
        for arm in ARMS:
            run_dir = seed_dir / arm
            if not (run_dir / "summary.json").is_file():
                continue
            t0 = time.perf_counter()
            # The full reports go where moekit analyze puts them (RUN_DIR/analysis); only the figures are kept here.
            s = analyze_run(run_dir, None, max_tokens=max_tokens,
                            num_permutations=20, hash_draws=hash_draws, log=lambda msg: None)
            for line in s["stack_summary"]:
                h = line["category_entropy_bits"]
                rows.append({
                    "seed": int(seed_dir.name.removeprefix("seed")), "arm": arm, "stack": line["stack"],
                    "category_entropy_bits": h, "trained_mi_bits": line["trained_mi_bits"],
                    "untrained_mi_bits": line["untrained_mi_bits"], "hash_mi_bits": line["hash_mi_bits"],
                    "excess_over_hash": (line["trained_mi_bits"] - line["hash_mi_bits"]) / h,
                    "gain_over_untrained": (line["trained_mi_bits"] - line["untrained_mi_bits"]) / h,
                    "examples": s["num_examples"],
                })
            print(f"[{time.strftime('%H:%M:%S')}] {seed_dir.name}/{arm} analysed in {time.perf_counter() - t0:.0f}s",
                  flush=True)
    return rows


def report(rows: list[dict], out: Path, command: str) -> str:
    lines = [
        "# Encoder vs decoder expert specialisation (ST-MoE section 7)",
        "",
        f"Command: `{command}`",
        "",
        "Mutual information (bits) between a token's category and its top-1 expert, mean over a stack's MoE layers;",
        "excess = (trained - load-matched hash) / H(category); gain = (trained - untrained) / H(category).",
        "",
        "| arm | seed | stack | H(category) | trained | untrained | hash | excess over hash | gain over untrained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['stack']} | {r['category_entropy_bits']:.3f} | {r['trained_mi_bits']:.4f}"
            f" | {r['untrained_mi_bits']:.4f} | {r['hash_mi_bits']:.4f} | {r['excess_over_hash']:+.4f} | "
            f"{r['gain_over_untrained']:+.4f} |"
        )
    lines += ["", "| arm | figure | seeds | mean ± 95 % | verdict (paper's side) |", "|---|---|---|---|---|"]
    results = {}
    for arm in ARMS:
        by_seed: dict[int, dict[str, dict]] = {}
        for r in rows:
            if r["arm"] == arm:
                by_seed.setdefault(r["seed"], {})[r["stack"]] = r
        seeds = sorted(s for s, v in by_seed.items() if {"encoder", "decoder"} <= set(v))
        if not seeds:
            continue
        figures = {
            "encoder excess over hash (paper: > 0)": ([by_seed[s]["encoder"]["excess_over_hash"] for s in seeds], 1),
            "decoder excess over hash (paper: ~0; no direction)": (
                [by_seed[s]["decoder"]["excess_over_hash"] for s in seeds], 0),
            "encoder - decoder excess (paper: > 0)": (
                [by_seed[s]["encoder"]["excess_over_hash"] - by_seed[s]["decoder"]["excess_over_hash"]
                 for s in seeds], 1),
            "encoder gain over untrained (paper: > 0)": (
                [by_seed[s]["encoder"]["gain_over_untrained"] for s in seeds], 1),
        }
        results[arm] = {}
        for name, (values, sign) in figures.items():
            m, half = interval(values)
            v = verdict(m, half, sign) if sign else "-"
            results[arm][name] = {"values": values, "mean": m, "half_width": half, "verdict": v}
            lines.append(f"| {arm} | {name} | {len(values)} | {m:+.4f} ± {half:.4f} | {v} |")
    (out / "results.json").write_text(json.dumps({"rows": rows, "results": results}, indent=1), encoding="utf-8")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="the --runs directory of benchmarks/repro/seq2seq_pretraining.py")
    p.add_argument("--out", default="docs/results/seq2seq_specialisation")
    p.add_argument("--max-tokens", type=int, default=16384, help="encoder input tokens analysed per run")
    p.add_argument("--hash-draws", type=int, default=20)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = analyse(Path(args.runs), args.max_tokens, args.hash_draws)
    if not rows:
        print(f"no finished sparse runs under {args.runs}", file=sys.stderr)
        return 2
    with (out / "specialisation.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    command = ("python benchmarks/repro/seq2seq_specialisation.py --runs RUNS "
               f"--out {args.out} --max-tokens {args.max_tokens} --hash-draws {args.hash_draws}")
    print(report(rows, out, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
