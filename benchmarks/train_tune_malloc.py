"""``moekit train`` tokens/s and max RSS under three allocator settings: ``shipped`` (what the command does:
``moekit.lab.runtime.tune_malloc`` plus ``trim_heap_every``, a thread that hands free heap pages back every few
seconds), ``tuned`` (``tune_malloc`` alone: the setting before the trimmer, whose max RSS grew with the number of
steps) and ``default`` (``--no-tune-malloc``: glibc's own thresholds).

Each run is a fresh ``moekit train`` process (the default switch-tiny config on the built-in corpus, a fresh run
directory under a temporary folder), so allocator state never carries over from one run to the next. For each
number of steps the variants alternate round by round, the order rotating every round, so the intermittent
slow-downs of a shared machine hit all alike. Per run: ``tokens_per_s`` of its ``summary.json`` (training steps
only: data preparation, evaluation and checkpoints excluded) and the process's max RSS (``ru_maxrss`` of
``os.wait4``: the kernel's high-water mark of resident memory, this process alone); reported are the medians per
variant and the tokens/s ratio to ``tuned``.

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
VARIANTS = ("shipped", "tuned", "default")
# "tuned": tune_malloc applied before the command runs, which then keeps its hands off (--no-tune-malloc), so no
# trimmer starts: the allocator exactly as it was before the trimmer existed.
_TUNED_ONLY = ("import sys; from moekit.lab.runtime import tune_malloc; tune_malloc(); "
               "from moekit.lab.cli import main; raise SystemExit(main(sys.argv[1:]))")


def train_args(steps: int, threads: int, run_dir: str, variant: str) -> list[str]:
    args = ["train", "--set", f"train.max_steps={steps}", "--set", f"train.threads={threads}",
            "--set", "train.progress=off", "--set", f"train.eval_every={steps}",
            "--set", f"train.checkpoint_every={steps}", "--run-dir", run_dir]
    return args + (["--no-tune-malloc"] if variant != "shipped" else [])


def command(steps: int, threads: int, run_dir: str, variant: str) -> list[str]:
    head = [sys.executable, "-c", _TUNED_ONLY] if variant == "tuned" else [sys.executable, "-m", "moekit"]
    return head + train_args(steps, threads, run_dir, variant)


def one_run(steps: int, threads: int, variant: str, tmp: Path, tag: str) -> dict:
    run_dir = tmp / f"{tag}-{variant}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(steps, threads, str(run_dir), variant), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would be a running max)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command(steps, threads, str(run_dir), variant))} failed ({proc.returncode})")
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"variant": variant, "tokens_per_s": summary["tokens_per_s"], "train_s": summary["train_time_s"],
            "wall_s": wall, "steps": summary["steps"], "final_val_loss": summary["final_val_loss"],
            "max_rss_gb": usage.ru_maxrss * 1024 / 1e9}  # ru_maxrss is in KiB on Linux


def render(result: dict) -> str:
    m = result["meta"]
    example = " ".join(train_args(m["steps"][0], m["threads"], "RUN_DIR", "shipped"))
    lines = [
        "# `moekit train`: tokens/s and max RSS under three allocator settings",
        "",
        f"switch-tiny (default config, built-in corpus), 16 x 128 tokens per step, {m['threads']} thread(s), torch "
        f"{m['torch']}, {m['rounds']} interleaved round(s) per number of steps, each run a fresh process. Command: "
        f"`{m['command']}`; each run is `moekit {example}` "
        f"with its number of steps (**shipped**: `tune_malloc` and the heap trimmer, what `moekit train` does), the "
        f"same with `--no-tune-malloc` after `tune_malloc()` in the process (**tuned**: the thresholds without the "
        f"trimmer, as before), or with `--no-tune-malloc` alone (**default**: glibc's own). Measured {m['date']} on "
        f"{m['machine']}.",
        "",
        "| steps | variant | tokens/s (median) | / tuned | max RSS GB (median) | runs: tokens/s | runs: max RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for steps, block in result["by_steps"].items():
        for v in VARIANTS:
            if v not in block["median_tokens_per_s"]:
                continue
            runs = [r[v] for r in block["rounds"]]
            speeds = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
            rss = ", ".join(f"{r['max_rss_gb']:.2f}" for r in runs)
            ratio = block["median_tokens_per_s"][v] / block["median_tokens_per_s"]["tuned"] \
                if "tuned" in block["median_tokens_per_s"] else float("nan")
            lines.append(
                f"| {steps} | {v} | {block['median_tokens_per_s'][v]:.0f} | {ratio:.2f} | "
                f"{block['median_max_rss_gb'][v]:.2f} | {speeds} | {rss} |"
            )
    lines += [
        "",
        "tokens/s is `summary.json`'s `tokens_per_s`: training steps only (data preparation, evaluation and "
        "checkpoint writes excluded); max RSS is the kernel's high-water mark of the process's resident memory "
        "(`ru_maxrss`), data preparation and the final evaluation included. The final validation losses of the "
        f"variants are identical at each number of steps ({'yes' if result['same_losses'] else 'NO'}): the "
        "allocator changes speed and memory, not numbers.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="runs per variant and number of steps (default 1)")
    ap.add_argument("--steps", default="50,500", help="comma-separated train.max_steps (default 50,500)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1, help="train.threads of every run (default 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import torch

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    step_list = [int(s) for s in args.steps.split(",") if s]
    by_steps: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moekit-tune-malloc-") as tmp:
        for steps in step_list:
            rounds = []
            for i in range(args.rounds):
                order = variants[i % len(variants):] + variants[:i % len(variants)]
                row = {v: one_run(steps, args.threads, v, Path(tmp), f"s{steps}-r{i}") for v in order}
                rounds.append(row)
                print(f"{steps} steps, round {i + 1}: " + ", ".join(
                    f"{v} {row[v]['tokens_per_s']:.0f} tokens/s {row[v]['max_rss_gb']:.2f} GB" for v in variants),
                    file=sys.stderr, flush=True)
            by_steps[steps] = {
                "rounds": rounds,
                "median_tokens_per_s": {v: statistics.median(r[v]["tokens_per_s"] for r in rounds) for v in variants},
                "median_max_rss_gb": {v: statistics.median(r[v]["max_rss_gb"] for r in rounds) for v in variants},
            }
    result = {
        "meta": {
            "steps": step_list, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
            "variants": variants,
            "command": "python benchmarks/train_tune_malloc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        },
        "by_steps": by_steps,
        "same_losses": all(len({r[v]["final_val_loss"] for r in b["rounds"] for v in variants}) == 1
                           for b in by_steps.values()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_tune_malloc.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "train_tune_malloc.md").write_text(render(result), encoding="utf-8")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
