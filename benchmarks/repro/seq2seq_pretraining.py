"""Encoder-decoder pre-training at matched FLOPs (Switch Transformer, Fedus et al. 2021; ST-MoE, Zoph et al. 2022):
does the sparse T5 reach its FLOP-matched dense T5's span-corruption quality in fewer steps, and end lower?

Four arms, every one trained from scratch on the built-in corpus with T5 span corruption (15 % noise, mean span 3;
128 input / 29 target tokens per example, 16 examples per step):

- ``switch``: configs/switch-t5-tiny.toml (top-1 of 8 experts in every other FFN of both stacks, capacity factor
  1.25 in training and 2.0 in evaluation, router jitter, balance loss 0.01);
- ``t5_dense``: configs/t5-dense-tiny.toml, its FLOP-matched dense model (``seq2seq_flop_matched_dense`` of it);
- ``stmoe``: configs/stmoe-t5-tiny.toml (top-2 of 8 in every fourth FFN, sparse-dense blocks, router z-loss 1e-3,
  capacity factor 1.25 in training and evaluation);
- ``stmoe_dense``: configs/repro/stmoe-t5-dense-tiny.toml, its FLOP-matched dense model (the FFN at the MoE position
  2 x 512 wide; the script checks that it equals ``seq2seq_flop_matched_dense`` of stmoe-t5-tiny).

Per seed (paired: every arm of a seed has the same ``train.seed``, hence the same training examples in the same
order, and the same validation split): ``--steps`` steps, the same schedule for every arm (the configs' lr 3e-3,
linear warm-up over 10 % of the steps, cosine to 0.1 x lr; not tuned per arm), validation on the whole held-out split
every ``--eval-every`` steps. Reported per run: the final validation loss, the curve, the steps the sparse model needs
to reach its dense partner's final loss of the same seed (linear interpolation between evaluations), the median
train step time; paired differences (sparse - dense) of the final loss with 95 % t intervals (the paper's side is
negative) and the ratio of steps to dense quality (the paper's side is below 1). Then the four models' training steps
are timed side by side (round robin on the same batches, one thread) so that FLOP matching can be read against wall
time.

Usage (one thread: the machine is shared)::

    python benchmarks/repro/seq2seq_pretraining.py --out docs/results/seq2seq_pretraining [--runs /tmp/s2s-runs]

Finished runs (``summary.json``) are skipped on a rerun; the results (``runs.csv``, ``curves.csv``, ``timing.json``,
``results.json``, ``results.md``, ``val_loss.png``) are rewritten into ``--out`` after every seed. Then

    python benchmarks/repro/seq2seq_pretraining.py --out docs/results/seq2seq_pretraining --section docs/RESULTS.md

writes (or replaces) the "Encoder-decoder pre-training at matched FLOPs" section of docs/RESULTS.md from
``results.json`` (and renders ``results.md`` and ``val_loss.png`` again from it); ``--notes FILE`` appends a
hand-written markdown file to the section.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.atomic import atomic_write_bytes, atomic_write_text
from moekit.lab.runtime import tune_malloc
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import RunConfig, load_run_config
from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE
from moekit.models import seq2seq_flop_matched_dense
from moekit.training.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, replace_section, wrap_markdown  # noqa: E402  (the shared t interval and RESULTS.md writing)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "switch": "configs/switch-t5-tiny.toml",
    "t5_dense": "configs/t5-dense-tiny.toml",
    "stmoe": "configs/stmoe-t5-tiny.toml",
    "stmoe_dense": "configs/repro/stmoe-t5-dense-tiny.toml",
}
ARMS = tuple(CONFIGS)
PAIRS = (("switch", "t5_dense"), ("stmoe", "stmoe_dense"))
NAMES = {
    "switch": "switch-t5-tiny (top-1 of 8, every other FFN)",
    "t5_dense": "t5-dense-tiny (Switch's FLOP-matched dense)",
    "stmoe": "stmoe-t5-tiny (top-2 of 8, every fourth FFN, sparse-dense)",
    "stmoe_dense": "stmoe-t5-dense-tiny (ST-MoE's FLOP-matched dense)",
}
SECTION = "## Encoder-decoder pre-training at matched FLOPs (Switch, ST-MoE)"


def verdict(mean: float, half: float, null: float = 0.0) -> str:
    """The paper's side is below ``null`` (lower loss; fewer steps)."""
    if math.isnan(half):
        return "not resolved at this scale"
    if mean + half < null:
        return "reproduced"
    if mean - half > null:
        return "contradicted"
    return "not resolved at this scale"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet(msg: str) -> None:
    pass


def summary_of(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def copy_data(src: Path, dst: Path) -> None:
    for name in (TOKENS_FILE, TOKENIZER_FILE):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)


def base_configs(args: argparse.Namespace) -> dict[str, RunConfig]:
    """The four arms' configs with the shared [train] values; checks that the pairs are FLOP-matched by
    construction and that every arm reads the same data."""
    overrides = [
        f"train.max_steps={args.steps}", f"train.warmup_steps={max(1, round(0.1 * args.steps))}",
        f"train.eval_every={args.eval_every}", 'train.eval_batches="none"', "train.checkpoint_every=0",
        "train.keep_checkpoints=2", "train.log_every=1", 'train.progress="off"', "train.threads=1",
    ]
    if args.max_chars:
        overrides.append(f"data.max_chars={args.max_chars}")
    cfgs = {arm: load_run_config(str(ROOT / path), overrides) for arm, path in CONFIGS.items()}
    for sparse, dense in PAIRS:
        if seq2seq_flop_matched_dense(cfgs[sparse].model) != cfgs[dense].model:
            raise SystemExit(f"{CONFIGS[dense]} is not seq2seq_flop_matched_dense({CONFIGS[sparse]})")
    first = cfgs[ARMS[0]]
    for arm, cfg in cfgs.items():
        if cfg.data != first.data or cfg.train != first.train:
            raise SystemExit(f"{arm}: [data] or [train] differs from {ARMS[0]}'s")
    return cfgs


def curve_of(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["val_loss"])) for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


def step_times(run_dir: Path) -> list[float]:
    """Seconds of each training step (the trainer's cumulative ``time_s``, logged every step, differenced)."""
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "time_s" in r and "loss" in r]
    return [b["time_s"] - a["time_s"] for a, b in zip(recs, recs[1:], strict=False) if b["step"] == a["step"] + 1]


def late_drop_fraction(run_dir: Path, steps: int) -> float | None:
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "drop_fraction" in r and r["step"] > steps - 50]
    return statistics.fmean(float(r["drop_fraction"]) for r in recs) if recs else None


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation curve reaches ``target`` (interpolated linearly between the
    evaluations on either side of the crossing); None when it never does."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def run_seed(seed: int, args: argparse.Namespace, cfgs: dict[str, RunConfig], data_src: Path | None,
             rows: list[dict]) -> Path:
    runs = Path(args.runs) / f"seed{seed}"
    for arm in ARMS:
        cfg = dataclasses.replace(cfgs[arm], train=dataclasses.replace(cfgs[arm].train, seed=seed))
        run_dir = runs / arm
        if summary_of(run_dir) is None:
            if run_dir.exists():  # an unfinished run of an interrupted session starts again (runs are minutes)
                shutil.rmtree(run_dir)
            if data_src is not None:
                run_dir.mkdir(parents=True)
                copy_data(data_src, run_dir)
            log(f"seed {seed}: {arm}, {cfg.train.max_steps} steps")
            train_run(cfg, run_dir, log=quiet)
        data_src = run_dir
        s = summary_of(run_dir)
        times = step_times(run_dir)
        task = cfg.task
        tokens = task._lengths(cfg)
        rows.append({
            "seed": seed, "arm": arm, "steps": s["steps"], "final_val_loss": s["final_val_loss"],
            "train_flops_per_token": s["train_flops_per_token"], "parameters_total": s["parameters_total"],
            "parameters_active": s["parameters_active"],
            "input_tokens": s["steps"] * cfg.train.batch_size * tokens[0],
            "target_tokens": s["steps"] * cfg.train.batch_size * tokens[1],
            "step_time_median_s": statistics.median(times) if times else None,
            "train_time_s": s["train_time_s"], "drop_fraction_last50": late_drop_fraction(run_dir, s["steps"]),
            "curve": curve_of(run_dir), "run_dir": str(run_dir),
        })
        log(f"seed {seed}: {arm} done, val {s['final_val_loss']:.4f}, "
            f"median step {rows[-1]['step_time_median_s']:.3f}s")
    return data_src


def time_side_by_side(cfgs: dict[str, RunConfig], data_dir: Path, rounds: int) -> dict:
    """Every arm's training step (the trainer's own ``_train_step``: forward, backward, clipping, AdamW) timed round
    robin on the same batches, so that every arm sees the same machine load; the first 3 rounds are warm-up."""
    from moekit.training.trainer import Trainer

    trainers, batches = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for arm, cfg in cfgs.items():
            run_dir = Path(tmp) / arm
            run_dir.mkdir()
            copy_data(data_dir, run_dir)
            task = cfg.task
            data = task.prepare(cfg, run_dir, quiet)
            if batches is None:
                source = task.batches(cfg, data)
                batches = [source.next_batch() for _ in range(rounds + 3)]
            torch.manual_seed(0)
            model = task.build_model(task.model_for_data(cfg, data))
            model.train()
            trainers[arm] = Trainer(cfg.train, model, None, None, run_dir, log=quiet)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r, (inputs, targets) in enumerate(batches):
            order = ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]
            for arm in order:
                t0 = time.perf_counter()
                trainers[arm]._train_step(inputs, targets)
                if r >= 3:
                    times[arm].append(time.perf_counter() - t0)
    return {arm: {"median_s": statistics.median(v), "q25_s": statistics.quantiles(v, n=4)[0],
                  "q75_s": statistics.quantiles(v, n=4)[2], "n": len(v)} for arm, v in times.items()}


def analyse(rows: list[dict], timing: dict | None, args: argparse.Namespace, command: str) -> dict:
    by = {(r["seed"], r["arm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    done = [s for s in seeds if all((s, a) in by for a in ARMS)]
    result: dict = {"args": dict(vars(args)), "command": command, "seeds": done, "arms": {}, "paired": {},
                    "steps_ratio": {}, "timing": timing}
    for arm in ARMS:
        rs = [by[(s, arm)] for s in done]
        if not rs:
            continue
        m, h = interval([r["final_val_loss"] for r in rs])
        result["arms"][arm] = {
            "config": CONFIGS[arm], "final_val_loss": [r["final_val_loss"] for r in rs], "mean": m, "half": h,
            "steps": rs[0]["steps"], "train_flops_per_token": rs[0]["train_flops_per_token"],
            "parameters_total": rs[0]["parameters_total"], "parameters_active": rs[0]["parameters_active"],
            "input_tokens": rs[0]["input_tokens"], "target_tokens": rs[0]["target_tokens"],
            "step_time_median_s": [r["step_time_median_s"] for r in rs],
            "drop_fraction_last50": [r["drop_fraction_last50"] for r in rs],
            "curves": [r["curve"] for r in rs],
        }
    for sparse, dense in PAIRS:
        if not done:
            continue
        diffs = [by[(s, sparse)]["final_val_loss"] - by[(s, dense)]["final_val_loss"] for s in done]
        m, h = interval(diffs)
        result["paired"][f"{sparse} - {dense}"] = {"per_seed": diffs, "mean": m, "half": h, "verdict": verdict(m, h)}
        sparse_steps, dense_steps, ratios = [], [], []
        for s in done:
            target = by[(s, dense)]["final_val_loss"]
            a = steps_to(by[(s, sparse)]["curve"], target)
            b = steps_to(by[(s, dense)]["curve"], target)
            sparse_steps.append(a)
            dense_steps.append(b)
            ratios.append(a / b if a is not None and b else None)
        entry: dict = {"sparse_steps": sparse_steps, "dense_steps": dense_steps, "per_seed": ratios}
        if all(x is not None for x in ratios):
            m, h = interval(ratios)
            entry.update(mean=m, half=h, verdict=verdict(m, h, null=1.0))
        else:
            reached = sum(x is not None for x in ratios)
            entry.update(mean=None, half=None,
                         verdict=f"not resolved at this scale ({len(ratios) - reached} of {len(ratios)} seeds never "
                                 "reach the dense model's final loss)")
        result["steps_ratio"][f"{sparse} / {dense}"] = entry
    return result


def write_results(rows: list[dict], timing: dict | None, out: Path, args: argparse.Namespace, command: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["seed", "arm", "steps", "input_tokens", "target_tokens", "train_flops_per_token", "parameters_total",
              "parameters_active", "final_val_loss", "steps_to_dense_final", "step_time_median_s", "train_time_s",
              "drop_fraction_last50", "run_dir"]
    result = analyse(rows, timing, args, command)
    reach = {}
    for (sparse, dense), key in zip(PAIRS, result["steps_ratio"], strict=False):
        entry = result["steps_ratio"][key]
        for i, s in enumerate(result["seeds"]):
            reach[(s, sparse)], reach[(s, dense)] = entry["sparse_steps"][i], entry["dense_steps"][i]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**{k: r.get(k, "") for k in fields},
                         "steps_to_dense_final": reach.get((r["seed"], r["arm"]), "")})
    atomic_write_text(out / "runs.csv", buf.getvalue())
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["seed", "arm", "step", "val_loss"])
    for r in rows:
        for step, loss in r["curve"]:
            writer.writerow([r["seed"], r["arm"], step, loss])
    atomic_write_text(out / "curves.csv", buf.getvalue())
    if timing is not None:
        atomic_write_text(out / "timing.json", json.dumps(timing, indent=1))
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", render(result))
    try:
        plot(result, out / "val_loss.png")
    except Exception as exc:  # a plot must not lose the numbers
        log(f"plot failed: {exc}")
    return result


def _fmt_steps(x: float | None, steps: int) -> str:
    return f">{steps}" if x is None else f"{x:.0f}"


def tables(result: dict, digits: int = 4) -> list[str]:
    seeds = result["seeds"]
    arms, n = result["arms"], len(seeds)
    f = f".{digits}f"
    lines = ["| arm | training MFLOP / target token | parameters (active) | "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % |",
             "|---|---|---|" + "---|" * n + "---|"]
    for arm, v in arms.items():
        per = " | ".join(f"{x:{f}}" for x in v["final_val_loss"])
        lines.append(f"| {NAMES[arm]} | {v['train_flops_per_token'] / 1e6:.2f} | {v['parameters_total'] / 1e6:.2f} M "
                     f"({v['parameters_active'] / 1e6:.2f} M) | {per} | {v['mean']:{f}} ± {v['half']:{f}} |")
    lines += ["", "Paired by seed (the paper's side: the difference below 0, the ratio below 1):", "",
              "| comparison | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % | verdict |",
              "|---|" + "---|" * n + "---|---|"]
    for name, v in result["paired"].items():
        per = " | ".join(f"{x:+{f}}" for x in v["per_seed"])
        text = v["verdict"] if v["verdict"].startswith("not resolved") else f"**{v['verdict']}**"
        lines.append(f"| final loss, {name} | {per} | {v['mean']:+{f}} ± {v['half']:{f}} | {text} |")
    for name, v in result["steps_ratio"].items():
        steps = arms[name.split(" / ")[0]]["steps"]
        per = " | ".join(
            f"{_fmt_steps(a, steps)} / {_fmt_steps(b, steps)}" + (f" = {r:.2f}" if r is not None else "")
            for a, b, r in zip(v["sparse_steps"], v["dense_steps"], v["per_seed"], strict=True))
        mean = f"{v['mean']:.2f} ± {v['half']:.2f}" if v["mean"] is not None else "-"
        text = v["verdict"] if v["verdict"].startswith("not resolved") else f"**{v['verdict']}**"
        lines.append(f"| steps to the dense final loss, {name} | {per} | {mean} | {text} |")
    return lines


def timing_lines(result: dict) -> list[str]:
    timing, arms = result.get("timing"), result["arms"]
    lines = ["| arm | training MFLOP / target token | side by side: median step s (IQR) | vs its dense | "
             "in the runs: median step s per seed |", "|---|---|---|---|---|"]
    dense_of = {a: b for s, b in PAIRS for a in (s, b)}
    for arm, v in arms.items():
        runs = ", ".join(f"{x:.3f}" for x in v["step_time_median_s"])
        if timing:
            t = timing[arm]
            side = f"{t['median_s']:.3f} ({t['q25_s']:.3f}-{t['q75_s']:.3f})"
            ratio = f"{t['median_s'] / timing[dense_of[arm]]['median_s']:.2f}x"
        else:
            side, ratio = "-", "-"
        lines.append(f"| {arm} | {v['train_flops_per_token'] / 1e6:.2f} | {side} | {ratio} | {runs} |")
    return lines


def render(result: dict) -> str:
    a = result["args"]
    any_arm = next(iter(result["arms"].values()), None)
    lines = [
        "# Encoder-decoder pre-training at matched FLOPs (Switch, ST-MoE)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{a['steps']} steps of 16 examples (128 input / 29 target tokens each) per run, lr 3e-3 with "
        f"{max(1, round(0.1 * a['steps']))} warm-up steps and cosine decay to 0.1 x, same for every arm; validation "
        f"(span corruption, nats per target token) on the whole held-out split every {a['eval_every']} steps; "
        f"seeds {result['seeds']}, paired by seed; "
        "± is the half-width of the 95 % t interval over seeds (t with n - 1 df)."
        + (f" Tokens per run: {any_arm['input_tokens']:,} input, {any_arm['target_tokens']:,} target."
           if any_arm else ""),
        "",
        "Final validation loss:",
        "",
        *tables(result),
        "",
        "Train step time (one thread; side by side = the four models' steps round robin on the same batches):",
        "",
        *timing_lines(result),
        "",
    ]
    for arm, v in result["arms"].items():
        drops = v["drop_fraction_last50"]
        if drops and all(x is not None for x in drops):
            lines.append(f"- {arm}: training drop fraction over the last 50 steps, per seed: "
                         + ", ".join(f"{x:.3f}" for x in drops))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Mean validation curves per arm (thin lines: the seeds), one panel per sparse/dense pair."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    colours = {"switch": "tab:red", "t5_dense": "black", "stmoe": "tab:blue", "stmoe_dense": "black"}
    for ax, (sparse, dense) in zip(axes, PAIRS, strict=True):
        for arm in (sparse, dense):
            v = result["arms"].get(arm)
            if not v:
                continue
            for c in v["curves"]:
                ax.plot([s for s, _ in c], [x for _, x in c], color=colours[arm], lw=0.6, alpha=0.35)
            steps = [s for s, _ in v["curves"][0]]
            mean = [statistics.fmean(c[i][1] for c in v["curves"]) for i in range(len(steps))]
            ax.plot(steps, mean, color=colours[arm], lw=2, label=f"{arm} (mean of {len(v['curves'])} seeds)")
        if result["arms"].get(dense):
            ax.axhline(result["arms"][dense]["mean"], color="grey", lw=0.8, ls="--", label=f"{dense} final (mean)")
        ax.set_title(f"{sparse} vs {dense}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("span-corruption validation loss (nats / target token)")
    lo = min(min(x for c in v["curves"] for _, x in c) for v in result["arms"].values())
    hi = max(max(x for c in v["curves"] for _, x in c) for v in result["arms"].values())
    axes[0].set_ylim(lo - 0.05, hi + 0.05)
    fig.tight_layout()
    with io.BytesIO() as buf:
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(path, buf.getvalue())


PAPER = {
    "switch - t5_dense": "the Switch model ends with a lower span-corruption loss than the FLOP-matched dense T5",
    "stmoe - stmoe_dense": "the ST-MoE model ends with a lower span-corruption loss than the FLOP-matched dense T5",
    "switch / t5_dense": "the Switch model reaches the dense model's final quality in fewer steps",
    "stmoe / stmoe_dense": "the ST-MoE model reaches the dense model's final quality in fewer steps",
}


def render_section(result: dict, out: str) -> str:
    """The RESULTS.md section from ``results.json``: question, setup, command, tables, plot, and one sentence per
    comparison saying what its interval supports."""
    a, arms, seeds = result["args"], result["arms"], result["seeds"]
    n, steps = len(seeds), a["steps"]
    rel = out.removeprefix("docs/")
    sw, st = arms["switch"], arms["stmoe"]
    lines = [
        SECTION,
        "",
        "**Question** (Fedus et al. 2021, \"Switch Transformers\", the T5 span-corruption pre-training comparisons "
        "against FLOP-matched T5-Base / T5-Large; Zoph et al. 2022, \"ST-MoE\"): pre-trained with T5 span corruption, "
        "does the sparse encoder-decoder reach the quality of the dense T5 with the same FLOPs per token in fewer "
        "steps, and end with a lower loss after the same number of steps? The papers report both (Switch-Base "
        "reaches T5-Base's quality about 7x faster in steps, and ends lower).",
        "",
        f"**Setup.** Four arms trained from scratch on the built-in corpus with T5 span corruption (15 % of the tokens "
        "masked in spans of mean length 3: each example is 128 input and 29 target tokens), 16 examples per step, "
        f"{steps} steps, {n} seeds per arm ({', '.join(str(s) for s in seeds)}), paired by seed (an arm's "
        "`train.seed` fixes its initialisation and its training examples, the same examples in the same order for "
        f"every arm of the seed): {sw['input_tokens']:,} input / {sw['target_tokens']:,} target tokens per run. "
        "`switch-t5-tiny` (T5 v1.1 blocks, d_model 128, 4 + 4 layers, top-1 of 8 experts of d_ff 512 in every other "
        "FFN of both stacks, capacity factor 1.25 in training and 2.0 in evaluation, router jitter 0.01, balance loss "
        "0.01) against `t5-dense-tiny` (every FFN dense, d_ff 512: its `seq2seq_flop_matched_dense`); "
        "`stmoe-t5-tiny` (top-2 of 8 in block 3 of each stack after an extra dense FFN, the sparse-dense block, "
        "capacity factor 1.25 in training and evaluation, router z-loss 1e-3) against "
        "`configs/repro/stmoe-t5-dense-tiny.toml` (the same layout with the FFN at the MoE position dense and 2 x 512 "
        "wide: `seq2seq_flop_matched_dense` of stmoe-t5-tiny, checked equal by the script). Training FLOPs per target "
        f"token: Switch {sw['train_flops_per_token'] / 1e6:.2f} M vs dense "
        f"{arms['t5_dense']['train_flops_per_token'] / 1e6:.2f} M, ST-MoE {st['train_flops_per_token'] / 1e6:.2f} M "
        f"vs dense {arms['stmoe_dense']['train_flops_per_token'] / 1e6:.2f} M (the difference is the router). Every "
        f"arm uses the configs' lr 3e-3 (AdamW), linear warm-up over {max(1, round(0.1 * steps))} steps and cosine "
        "decay to 0.3e-3 at the last step: the same schedule, not tuned for any arm (so all arms are equally "
        "untuned). Validation on the whole held-out split (30,060 tokens, in eval mode, so Switch routes at capacity "
        f"factor 2.0) every {a['eval_every']} steps; \"steps to the dense final loss\" is the first step at which an "
        "arm's validation curve reaches the dense partner's final loss of the same seed, interpolated linearly "
        "between evaluations (for the dense model itself that is normally its last step). One torch thread per run, "
        "runs one after another on 2 shared cores.",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        f"Results ([{out}/results.md]({rel}/results.md); every run in [runs.csv]({rel}/runs.csv), the curves in "
        f"[curves.csv]({rel}/curves.csv)); final span-corruption validation loss, nats per target token:",
        "",
        *tables(result, digits=3),
        "",
        f"![validation loss curves]({rel}/val_loss.png)",
        "",
        "Train step time, the four models' training steps timed round robin on the same batches (one thread, "
        "median over the rounds), and the median of each run's own steps:",
        "",
        *timing_lines(result),
        "",
    ]
    sentences = []
    for name, v in list(result["paired"].items()) + list(result["steps_ratio"].items()):
        what = PAPER[name]
        if v.get("mean") is None:
            sentences.append(f"{name}: {v['verdict']}; the papers: {what}.")
            continue
        num = f"{v['mean']:+.3f} ± {v['half']:.3f}" if " - " in name else f"{v['mean']:.2f} ± {v['half']:.2f}"
        if v["verdict"] == "reproduced":
            sentences.append(f"{name}: {num}, reproduced: {what}.")
        elif v["verdict"] == "contradicted":
            sentences.append(f"{name}: {num}, contradicted: the papers say {what}; here the interval excludes "
                             f"{'zero' if ' - ' in name else 'one'} on the other side.")
        else:
            sentences.append(f"{name}: {num}, not resolved at this scale (the papers: {what}).")
    lines += ["**What this says.** " + " ".join(sentences), ""]
    return wrap_markdown(lines)


def write_section(results_md: Path, out: Path, notes: Path | None = None) -> None:
    """Replace (or append) the section of ``results_md`` with one rendered from ``out/results.json`` (plus the
    hand-written ``notes`` markdown, if given, at its end); the next ``## `` heading ends it."""
    result = json.loads((out / "results.json").read_text())
    section = render_section(result, str(out))
    replace_section(results_md, SECTION, section, notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/results/seq2seq_pretraining", help="where the tables and the plot go")
    p.add_argument("--runs", default="/tmp/s2s-pretraining-runs", help="where the run directories go")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--timing-rounds", type=int, default=20, help="side-by-side timed steps per arm (0: none)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N corpus characters (smoke tests)")
    p.add_argument("--section", default=None, metavar="RESULTS_MD",
                   help="train nothing: write this experiment's section of RESULTS_MD from --out/results.json")
    p.add_argument("--notes", default=None, help="with --section: a markdown file appended to the section")
    args = p.parse_args(argv)
    if args.section:
        # The tables and the plot in --out are rendered again from results.json as well (same numbers).
        result = json.loads((Path(args.out) / "results.json").read_text())
        atomic_write_text(Path(args.out) / "results.md", render(result))
        plot(result, Path(args.out) / "val_loss.png")
        write_section(Path(args.section), Path(args.out), Path(args.notes) if args.notes else None)
        log(f"wrote the {SECTION!r} section of {args.section}")
        return 0
    torch.set_num_threads(1)
    tune_malloc()  # as moekit train and compare do by default
    command = "python benchmarks/repro/seq2seq_pretraining.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cfgs = base_configs(args)
    rows: list[dict] = []
    timing = None
    timing_path = Path(args.runs) / "timing.json"
    t0 = time.perf_counter()
    data_src = None
    for seed in range(args.seeds):
        data_src = run_seed(seed, args, cfgs, data_src, rows)
        if seed == 0 and args.timing_rounds > 0:
            if timing_path.is_file():
                timing = json.loads(timing_path.read_text())
            else:
                log(f"timing the four training steps side by side, {args.timing_rounds} rounds")
                timing = time_side_by_side(cfgs, data_src, args.timing_rounds)
                atomic_write_text(timing_path, json.dumps(timing, indent=1))
            log("side by side: " + ", ".join(f"{k} {v['median_s']:.3f}s" for k, v in timing.items()))
        write_results(rows, timing, Path(args.out), args, command)
        log(f"seed {seed} finished; {time.perf_counter() - t0:.0f}s so far")
    log(f"wrote {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
