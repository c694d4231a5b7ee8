"""``moekit train`` tokens/s with and without glibc malloc tuning (``moekit.lab.runtime.tune_malloc``, which the
command applies unless ``--no-tune-malloc``).

Each run is a fresh ``moekit train`` process (the default switch-tiny config on the built-in corpus, a fresh run
directory under a temporary folder), so allocator state never carries over from one run to the next. The two
variants alternate round by round, the order swapping every round, so the intermittent slow-downs of a shared
machine hit both alike. The figure per run is ``tokens_per_s`` of its ``summary.json`` (training steps only: data
preparation, evaluation and checkpoints excluded); reported are the medians per variant, their ratio, and the
median of the per-round ratios.

    python benchmarks/train_tune_malloc.py     # writes benchmarks/results/train_tune_malloc.{md,json}
    python benchmarks/train_tune_malloc.py --rounds 1 --steps 5 --out /tmp/tm   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("tuned", "default")  # tuned: moekit train as shipped; default: --no-tune-malloc


def train_args(steps: int, threads: int, run_dir: str, variant: str) -> list[str]:
    args = ["train", "--set", f"train.max_steps={steps}", "--set", f"train.threads={threads}",
            "--set", "train.progress=off", "--set", f"train.eval_every={steps}", "--run-dir", run_dir]
    return args + (["--no-tune-malloc"] if variant == "default" else [])


def one_run(steps: int, threads: int, variant: str, tmp: Path, tag: str) -> dict:
    run_dir = tmp / f"{tag}-{variant}"
    cmd = [sys.executable, "-m", "moekit", *train_args(steps, threads, str(run_dir), variant)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"variant": variant, "tokens_per_s": summary["tokens_per_s"], "train_s": summary["train_time_s"],
            "wall_s": wall, "steps": summary["steps"], "final_val_loss": summary["final_val_loss"]}


def render(result: dict) -> str:
    m = result["meta"]
    med = result["median_tokens_per_s"]
    lines = [
        "# `moekit train` with and without glibc malloc tuning",
        "",
        f"switch-tiny (default config, built-in corpus), {m['steps']} steps of 16 x 128 tokens, {m['threads']} "
        f"thread(s), torch {m['torch']}, {m['rounds']} interleaved rounds (order swapped every round), each run a "
        f"fresh process. Command: `{m['command']}`; each run is "
        f"`moekit {' '.join(train_args(m['steps'], m['threads'], 'RUN_DIR', 'tuned'))}` (tuned, the default) or "
        f"the same with `--no-tune-malloc`. Measured {m['date']} on {m['machine']}.",
        "",
        "| round | tuned tokens/s | --no-tune-malloc tokens/s | tuned / default |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(result["rounds"]):
        lines.append(f"| {i + 1} | {r['tuned']['tokens_per_s']:.0f} | {r['default']['tokens_per_s']:.0f} | "
                     f"{r['ratio']:.3f} |")
    lines += [
        f"| **median** | **{med['tuned']:.0f}** | **{med['default']:.0f}** | **{result['ratio_of_medians']:.3f}** "
        f"(median of per-round ratios {result['median_round_ratio']:.3f}) |",
        "",
        "tokens/s is `summary.json`'s `tokens_per_s`: training steps only (data preparation, evaluation and "
        "checkpoint writes excluded). The final validation losses of the two variants are identical "
        f"({'yes' if result['same_losses'] else 'NO'}): the allocator setting changes speed, not numbers.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="runs per variant (default 3)")
    ap.add_argument("--steps", type=int, default=60, help="train.max_steps of every run (default 60)")
    ap.add_argument("--threads", type=int, default=1, help="train.threads of every run (default 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import torch

    rounds = []
    with tempfile.TemporaryDirectory(prefix="moekit-tune-malloc-") as tmp:
        for i in range(args.rounds):
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            row = {v: one_run(args.steps, args.threads, v, Path(tmp), f"r{i}") for v in order}
            row["ratio"] = row["tuned"]["tokens_per_s"] / row["default"]["tokens_per_s"]
            rounds.append(row)
            print(f"round {i + 1}: tuned {row['tuned']['tokens_per_s']:.0f} tokens/s, default "
                  f"{row['default']['tokens_per_s']:.0f} (ratio {row['ratio']:.3f})", file=sys.stderr, flush=True)
    med = {v: statistics.median(r[v]["tokens_per_s"] for r in rounds) for v in VARIANTS}
    result = {
        "meta": {
            "steps": args.steps, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
            "command": "python benchmarks/train_tune_malloc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        },
        "rounds": rounds,
        "median_tokens_per_s": med,
        "ratio_of_medians": med["tuned"] / med["default"],
        "median_round_ratio": statistics.median(r["ratio"] for r in rounds),
        "same_losses": len({r[v]["final_val_loss"] for r in rounds for v in VARIANTS}) == 1,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_tune_malloc.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "train_tune_malloc.md").write_text(render(result), encoding="utf-8")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
