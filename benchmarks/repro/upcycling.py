"""Sparse upcycling (Komatsuzaki et al. 2022) at small scale: is it better to turn a trained dense model into an
MoE and keep training it, than to keep training the dense model, or to train the same MoE from scratch?

Per seed (paired: every arm of a seed shares the seed, the tokens and the validation split):

- ``dense``: a dense LM of ``configs/dense-tiny.toml``'s shape on the built-in corpus, trained ``--dense-steps`` N
  steps. Its compute is the "sunk cost".
- the same *extra* training compute (``--extra-steps`` X dense-step equivalents, in training FLOPs) spent on
  (a) ``continue``: the dense model trained X more steps from its weights;
  (b) ``upcycled``: the dense model upcycled (``moekit.upcycle``: E experts, top-k, every other FFN, renormalised
      gates, dropless) and trained for the steps that cost X dense steps;
  (c) ``scratch``: the same MoE from a random init, trained for as many steps as (b);
  (c') ``scratch_total``: the same MoE from a random init given the total compute of dense-N + extra;
  and, as a reference, ``dense_total``: the dense model trained N + X steps under one schedule (what restarting the
  schedule costs (a)).
- Steps are matched in training FLOPs (``moekit.models.flops``: 3 x forward, the run summary's
  ``train_flops_per_token``): the MoE arms run ``round(X * F_dense / F_moe)`` steps. Same batch (16 x 128 tokens)
  and peak learning rate for every run; each run (new or continued) warms up linearly over 10 % of its own steps
  and then decays by cosine to 0.1 x the peak at its last step (so a continued phase re-warms and decays over the
  extra steps, the same for every arm).
- Reported: the validation loss on the whole validation split at the end of each run; paired differences
  (b - a), (b - c), (b - c') per seed with the 95 % t interval over seeds. The paper's side is negative for each
  (upcycled better); verdict "reproduced" when the interval excludes 0 on that side, "contradicted" when it
  excludes 0 on the other, else "not resolved at this scale".

Usage (one thread: the machine is shared)::

    python benchmarks/repro/upcycling.py --out docs/results/upcycling [--runs /tmp/upcycling-runs]

Runs that finished (``summary.json``) are skipped on a rerun; the results (``upcycling.csv``, ``results.md``,
``results.json``, ``val_loss.png``) are written into ``--out`` after every seed. Then

    python benchmarks/repro/upcycling.py --out docs/results/upcycling --section docs/RESULTS.md

writes (or replaces) the "Sparse upcycling" section of docs/RESULTS.md from ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from moekit.atomic import atomic_write_text
from moekit.lab.training.run import load_trained_run, start_run_from_weights, train_run
from moekit.lab.training.run_config import RunConfig, load_run_config
from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE
from moekit.upcycle import upcycle, upcycle_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, replace_section, wrap_markdown  # noqa: E402  (the shared t interval and RESULTS.md writing)

ROOT = Path(__file__).resolve().parents[2]
ARMS = ("dense", "continue", "upcycled", "scratch", "scratch_total", "dense_total")
DIFFS = (("upcycled", "continue"), ("upcycled", "scratch"), ("upcycled", "scratch_total"))
# Not a claim of the paper: what restarting the schedule costs the dense model (continued vs one schedule).
REFERENCE_DIFFS = (("continue", "dense_total"),)


def verdict(mean: float, half: float) -> str:
    """The paper's side is negative (the upcycled model has the lower loss)."""
    if math.isnan(half):
        return "not resolved at this scale"
    if mean + half < 0:
        return "reproduced"
    if mean - half > 0:
        return "contradicted"
    return "not resolved at this scale"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def with_train(cfg: RunConfig, **values) -> RunConfig:
    steps = values.get("max_steps", cfg.train.max_steps)
    values.setdefault("warmup_steps", max(1, round(0.1 * steps)))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **values))


def copy_data(src: Path, dst: Path) -> None:
    for name in (TOKENS_FILE, TOKENIZER_FILE):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)


def summary_of(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fresh_dir(run_dir: Path) -> None:
    """An unfinished run of an interrupted session is started again from nothing (runs are minutes long)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def quiet(msg: str) -> None:
    pass


def run_seed(seed: int, args: argparse.Namespace, base: RunConfig, data_src: Path | None, rows: list[dict]) -> Path:
    runs = Path(args.runs) / f"seed{seed}"
    N, X = args.dense_steps, args.extra_steps
    dense_cfg = with_train(base, seed=seed, max_steps=N)
    moe_model_cfg = upcycle_config(dense_cfg.model, num_experts=args.experts, top_k=args.top_k, moe_every=2,
                                   moe_offset=1)
    moe_cfg = dataclasses.replace(dense_cfg, model=moe_model_cfg)
    task = dense_cfg.task
    f_dense = task.cost(dense_cfg.model, dense_cfg).train_flops_per_token
    f_moe = task.cost(moe_model_cfg, moe_cfg).train_flops_per_token
    moe_extra = round(X * f_dense / f_moe)
    moe_total = round((N + X) * f_dense / f_moe)
    tokens_per_step = base.train.batch_size * base.data.seq_len

    def record(arm: str, run_dir: Path, steps: int, flops_per_token: float, phase_of_total: float, extra: dict):
        s = summary_of(run_dir)
        rows.append({
            "seed": seed, "arm": arm, "steps": steps, "train_flops_per_token": flops_per_token,
            "phase_train_flops": steps * tokens_per_step * flops_per_token,
            "total_train_flops": phase_of_total + steps * tokens_per_step * flops_per_token,
            "final_val_loss": s["final_val_loss"], "train_time_s": s["train_time_s"], "run_dir": str(run_dir),
            **extra,
        })

    # -- dense: N steps from scratch --------------------------------------------------------------------------
    dense_dir = runs / "dense"
    if summary_of(dense_dir) is None:
        fresh_dir(dense_dir)
        if data_src is not None:
            dense_dir.mkdir(parents=True)
            copy_data(data_src, dense_dir)
        log(f"seed {seed}: dense, {N} steps")
        train_run(dense_cfg, dense_dir, log=quiet)
    dense_flops = N * tokens_per_step * f_dense
    record("dense", dense_dir, N, f_dense, 0.0, {})
    log(f"seed {seed}: dense done, val {rows[-1]['final_val_loss']:.4f}")
    dense_model = load_trained_run(dense_dir).model

    # -- (a) continue dense, (b) upcycled: runs created from given weights, trained by a resume ----------------
    for arm, cfg, steps in (("continue", dense_cfg, X), ("upcycled", moe_cfg, moe_extra)):
        run_dir = runs / arm
        extra: dict = {}
        if summary_of(run_dir) is None:
            fresh_dir(run_dir)
            run_dir.mkdir(parents=True)
            copy_data(dense_dir, run_dir)
            if arm == "upcycled":
                gen = torch.Generator().manual_seed(1000 + seed)
                model = upcycle(dense_model, num_experts=args.experts, top_k=args.top_k, generator=gen)
            else:
                model = dense_model
            start_run_from_weights(with_train(cfg, max_steps=steps), run_dir, model)
            log(f"seed {seed}: {arm}, {steps} steps from the dense weights")
            train_run(None, run_dir, resume=True, log=quiet)
        if arm == "upcycled":
            extra["init_val_loss"] = init_loss(run_dir)
        record(arm, run_dir, steps, f_moe if arm == "upcycled" else f_dense, dense_flops, extra)
        log(f"seed {seed}: {arm} done, val {rows[-1]['final_val_loss']:.4f}")

    # -- (c) and (c') the MoE from scratch --------------------------------------------------------------------
    for arm, steps, sunk in (("scratch", moe_extra, dense_flops), ("scratch_total", moe_total, 0.0)):
        run_dir = runs / arm
        if summary_of(run_dir) is None:
            fresh_dir(run_dir)
            run_dir.mkdir(parents=True)
            copy_data(dense_dir, run_dir)
            log(f"seed {seed}: {arm}, {steps} steps from a random init")
            train_run(with_train(moe_cfg, max_steps=steps), run_dir, log=quiet)
        # (c)'s comparison charges it the dense sunk cost as well (the same total as (b)); (c') spends it all.
        record(arm, run_dir, steps, f_moe, sunk, {})
        log(f"seed {seed}: {arm} done, val {rows[-1]['final_val_loss']:.4f}")

    # -- reference: the dense model trained N + X steps under one schedule (what the restart costs (a)) --------
    run_dir = runs / "dense_total"
    if summary_of(run_dir) is None:
        fresh_dir(run_dir)
        run_dir.mkdir(parents=True)
        copy_data(dense_dir, run_dir)
        log(f"seed {seed}: dense_total, {N + X} steps from a random init")
        train_run(with_train(dense_cfg, max_steps=N + X), run_dir, log=quiet)
    record("dense_total", run_dir, N + X, f_dense, 0.0, {})
    log(f"seed {seed}: dense_total done, val {rows[-1]['final_val_loss']:.4f}")
    return dense_dir


def init_loss(run_dir: Path) -> float:
    """The upcycled model's validation loss at step 0 (read from the metrics of its first evaluation is not
    possible: runs evaluate at the end only), computed from its initial weights on the whole validation split."""
    from moekit.data.batches import TokenEvalData

    cache = run_dir / "init_val_loss.json"
    if cache.is_file():
        return float(json.loads(cache.read_text())["init_val_loss"])
    run = load_trained_run(run_dir)  # no checkpoint would be read: the run has them, so load init explicitly
    from moekit.training import checkpoint as ckpt

    ckpt.load_initial_weights(run_dir / run.config.train.init_from, run.model)
    run.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in TokenEvalData(run.data.val_tokens, run.config.data.seq_len).batches(
            run.config.train.batch_size, None
        ):
            out = run.model(inputs, targets)
            total += float(out.ce_loss) * targets.numel()
            count += targets.numel()
    loss = total / count
    atomic_write_text(cache, json.dumps({"init_val_loss": loss}))
    return loss


def write_results(rows: list[dict], out: Path, args: argparse.Namespace, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = ["seed", "arm", "steps", "train_flops_per_token", "phase_train_flops", "total_train_flops",
              "final_val_loss", "init_val_loss", "train_time_s", "run_dir"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in fields})
    atomic_write_text(out / "upcycling.csv", buf.getvalue())
    by = {(r["seed"], r["arm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    done = [s for s in seeds if all((s, a) in by for a in ARMS)]
    result: dict = {"args": {k: v for k, v in vars(args).items()}, "command": command, "seeds": done, "arms": {},
                    "paired": {}}
    for arm in ARMS:
        vals = [by[(s, arm)]["final_val_loss"] for s in done]
        if vals:
            m, h = interval(vals)
            first = by[(done[0], arm)]
            result["arms"][arm] = {"mean": m, "half": h, "per_seed": vals, "steps": first["steps"],
                                   "total_train_flops": first["total_train_flops"],
                                   "train_flops_per_token": first["train_flops_per_token"]}
            if arm == "upcycled":
                result["init_val_loss"] = [by[(s, arm)].get("init_val_loss") for s in done]
    for a, b in DIFFS + REFERENCE_DIFFS:
        diffs = [by[(s, a)]["final_val_loss"] - by[(s, b)]["final_val_loss"] for s in done]
        if diffs:
            m, h = interval(diffs)
            key = "paired" if (a, b) in DIFFS else "reference"
            result.setdefault(key, {})[f"{a} - {b}"] = {"mean": m, "half": h, "per_seed": diffs,
                                                       "verdict": verdict(m, h) if key == "paired" else ""}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", render(result, by, done))
    try:
        plot(by, done, out / "val_loss.png")
    except Exception as exc:  # a plot must not lose the numbers
        log(f"plot failed: {exc}")


NAMES = {
    "dense": "dense, N steps (the starting point)",
    "continue": "(a) dense continued",
    "upcycled": "(b) upcycled MoE",
    "scratch": "(c) MoE from scratch, extra compute only",
    "scratch_total": "(c') MoE from scratch, dense + extra compute",
    "dense_total": "reference: dense, N + X steps under one schedule",
}


def render(result: dict, by: dict, done: list[int]) -> str:
    a = result["args"]
    lines = [
        "# Sparse upcycling at small scale",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Dense: configs/dense-tiny.toml shape, {a['dense_steps']} steps; extra compute: {a['extra_steps']} dense-step "
        f"equivalents in training FLOPs; MoE: {a['experts']} experts, top-{a['top_k']}, every other FFN, "
        "renormalised gates, dropless. Validation loss (nats/token) on the whole validation split at each run's end; "
        f"seeds {done}; ± is the half-width of the 95 % t interval over seeds.",
        "",
        "| arm | steps | total training FLOPs | " + " | ".join(f"seed {s}" for s in done) + " | mean ± 95 % |",
        "|---|---|---|" + "---|" * len(done) + "---|",
    ]
    for arm, v in result["arms"].items():
        per = " | ".join(f"{x:.4f}" for x in v["per_seed"])
        lines.append(f"| {NAMES[arm]} | {v['steps']} | {v['total_train_flops']:.3e} | {per} | "
                     f"{v['mean']:.4f} ± {v['half']:.4f} |")
    init = [by[(s, "upcycled")].get("init_val_loss") for s in done]
    if all(x is not None for x in init) and init:
        dense = [by[(s, "dense")]["final_val_loss"] for s in done]
        gap = max(abs(x - y) for x, y in zip(init, dense, strict=True))
        lines += ["", f"The upcycled model before training: validation loss {', '.join(f'{x:.4f}' for x in init)} "
                      f"(the dense model's, largest difference {gap:.1e})."]
    lines += ["", "Paired differences (the paper's side is negative: the upcycled model better):", "",
              "| difference | " + " | ".join(f"seed {s}" for s in done) + " | mean ± 95 % | verdict |",
              "|---|" + "---|" * len(done) + "---|---|"]
    for name, v in result["paired"].items():
        per = " | ".join(f"{x:+.4f}" for x in v["per_seed"])
        lines.append(f"| {name} | {per} | {v['mean']:+.4f} ± {v['half']:.4f} | {v['verdict']} |")
    for name, v in result.get("reference", {}).items():
        per = " | ".join(f"{x:+.4f}" for x in v["per_seed"])
        lines.append(f"| {name} (reference, no paper claim) | {per} | {v['mean']:+.4f} ± {v['half']:.4f} | |")
    return "\n".join(lines) + "\n"


PAPER = {
    "upcycled - continue": "the upcycled MoE ends below the dense model continued with the same extra compute",
    "upcycled - scratch": "the upcycled MoE ends below the same MoE trained from scratch with the same extra compute",
    "upcycled - scratch_total": (
        "the upcycled MoE ends below the same MoE trained from scratch with the whole budget, dense + extra (the "
        "paper's own claim is the weaker one against a from-scratch MoE given 100 % of the dense budget; this one "
        "gives the from-scratch MoE the extra compute as well)"
    ),
}
SECTION = "## Sparse upcycling"


def render_section(result: dict, out: str) -> str:
    """The "Sparse upcycling" section of docs/RESULTS.md, from ``results.json``: question, setup, command, the
    tables, and one sentence per paired difference saying what its interval supports."""
    a = result["args"]
    arms, paired, seeds = result["arms"], result["paired"], result["seeds"]
    n = len(seeds)
    lines = [
        SECTION,
        "",
        "**Question** (Komatsuzaki et al. 2022, \"Sparse Upcycling: Training Mixture-of-Experts from Dense "
        "Checkpoints\"): given a trained dense model, is it better to upcycle it into an MoE (every expert a copy of "
        "the dense FFN, ALGORITHMS.md section 20) and train that, than to keep training the dense model, or to train "
        "the same MoE from scratch? The paper (T5 and ViT, up to XL) reports upcycled models that \"significantly "
        "outperform their dense counterparts ... using only ~50% of the initial dense pretraining sunk cost\" and "
        "\"also outperform sparse models trained from scratch on 100% of the initial dense pretraining computation "
        "budget\".",
        "",
        f"**Setup.** Per seed ({n} seeds, paired: every arm of a seed shares the seed, the tokens and the validation "
        f"split): a dense LM of `configs/dense-tiny.toml`'s shape (4 blocks, d_model 128, d_ff 512, built-in corpus, "
        f"16 x 128 tokens per step, AdamW at lr 3e-3) trained {a['dense_steps']} steps; then the same extra training "
        f"compute, {a['extra_steps']} dense-step equivalents in training FLOPs (`train_flops_per_token` of the run "
        "summary, 3 x forward), spent on (a) the dense model continued, (b) the dense model upcycled "
        f"(`moekit.upcycle`: {a['experts']} experts, top-{a['top_k']} with renormalised gates, every other FFN, "
        "dropless, router rows N(0, 0.02^2); load-balancing loss c_B = 0.01 as every MoE here), (c) the same MoE "
        f"from scratch with the same extra compute, and (c') the same MoE from scratch with the total compute of "
        f"dense-{a['dense_steps']} + extra; as a reference, the dense model trained "
        f"{a['dense_steps'] + a['extra_steps']} steps under one schedule (what restarting the schedule costs (a)). "
        "The MoE costs "
        f"{arms['upcycled']['train_flops_per_token'] / arms['continue']['train_flops_per_token']:.2f}x the dense "
        "model's training "
        f"FLOPs per token, so it runs {arms['upcycled']['steps']} steps where the dense model runs "
        f"{a['extra_steps']} ((c') {arms['scratch_total']['steps']}). Every run, new or continued, warms up "
        "linearly over 10 % of its own steps and decays by cosine to 0.1 x lr at its last step, so a continued "
        "phase re-warms and decays over the extra steps, the same for (a) and (b). Validation loss at each run's end "
        "on the whole validation split; differences paired by seed with 95 % t intervals; the paper's side is "
        "negative for all three (the upcycled model lower). For (c') that reads the paper's claim against a "
        "from-scratch MoE on 100 % of the dense budget as holding at the same total budget, a stronger statement "
        "than the paper makes.",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        f"Results ([{out}/results.md]({out.removeprefix('docs/')}/results.md), every run in "
        f"[upcycling.csv]({out.removeprefix('docs/')}/upcycling.csv)); final validation loss, nats/token:",
        "",
        "| arm | steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % |",
        "|---|---|" + "---|" * n + "---|",
    ]
    for arm, v in arms.items():
        per = " | ".join(f"{x:.3f}" for x in v["per_seed"])
        lines.append(f"| {NAMES[arm]} | {v['steps']} | {per} | {v['mean']:.3f} ± {v['half']:.3f} |")
    lines += ["", "| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % | verdict |",
              "|---|" + "---|" * n + "---|---|"]
    for name, v in paired.items():
        per = " | ".join(f"{x:+.3f}" for x in v["per_seed"])
        verdict_text = v["verdict"] if v["verdict"] == "not resolved at this scale" else f"**{v['verdict']}**"
        lines.append(f"| {name} | {per} | {v['mean']:+.3f} ± {v['half']:.3f} | {verdict_text} |")
    for name, v in result.get("reference", {}).items():
        per = " | ".join(f"{x:+.3f}" for x in v["per_seed"])
        lines.append(f"| {name} (reference: the cost of restarting the schedule) | {per} | "
                     f"{v['mean']:+.3f} ± {v['half']:.3f} | no paper claim |")
    init = result.get("init_val_loss") or []
    if init and all(x is not None for x in init):
        gap = max(abs(x - y) for x, y in zip(init, arms["dense"]["per_seed"], strict=True))
        lines += ["", f"Before its first step the upcycled model's validation loss was the dense model's (largest "
                      f"difference over the seeds {gap:.1e} nats): the identity at initialisation holds on the whole "
                      "validation split."]
    lines += ["", f"![validation loss against total training FLOPs]({out.removeprefix('docs/')}/val_loss.png)", ""]
    sentences = []
    for name, v in paired.items():
        what = PAPER[name]
        if v["verdict"] == "reproduced":
            sentences.append(f"{name}: {v['mean']:+.3f} ± {v['half']:.3f}, reproduced: {what}.")
        elif v["verdict"] == "contradicted":
            sentences.append(f"{name}: {v['mean']:+.3f} ± {v['half']:.3f}, contradicted: the paper says {what}; "
                             "here the interval excludes zero on the other side.")
        else:
            sentences.append(f"{name}: {v['mean']:+.3f} ± {v['half']:.3f}, not resolved at this scale (the paper: "
                             f"{what}).")
    lines += ["**What this says.** " + " ".join(sentences), ""]
    return wrap_markdown(lines)


def write_section(results_md: Path, out: Path) -> None:
    """Replace (or append) the "Sparse upcycling" section of ``results_md`` with one rendered from
    ``out/results.json``; the next ``## `` heading ends it."""
    result = json.loads((out / "results.json").read_text())
    section = render_section(result, str(out))
    replace_section(results_md, SECTION, section)


def plot(by: dict, done: list[int], path: Path) -> None:
    """Validation loss against total training FLOPs: the dense start, then each arm's end point, per seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colours = {"dense": "black", "continue": "tab:blue", "upcycled": "tab:red", "scratch": "tab:green",
               "scratch_total": "tab:purple", "dense_total": "tab:gray"}
    for arm in ARMS:
        xs = [by[(s, arm)]["total_train_flops"] for s in done]
        ys = [by[(s, arm)]["final_val_loss"] for s in done]
        ax.scatter(xs, ys, color=colours[arm], label=NAMES[arm], s=25)
    ax.set_xlabel("total training FLOPs (dense sunk cost included for a, b, c)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with io.BytesIO() as buf:
        fig.savefig(buf, format="png", dpi=110)
        from moekit.atomic import atomic_write_bytes

        atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/results/upcycling", help="where the tables and the plot go")
    p.add_argument("--runs", default="/tmp/upcycling-runs", help="where the run directories go")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dense-steps", type=int, default=200)
    p.add_argument("--extra-steps", type=int, default=200)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N corpus characters (smoke tests)")
    p.add_argument("--config", default=str(ROOT / "configs" / "dense-tiny.toml"))
    p.add_argument("--section", default=None, metavar="RESULTS_MD",
                   help="train nothing: write the 'Sparse upcycling' section of RESULTS_MD from --out/results.json")
    args = p.parse_args(argv)
    if args.section:
        write_section(Path(args.section), Path(args.out))
        log(f"wrote the {SECTION!r} section of {args.section}")
        return 0
    torch.set_num_threads(1)
    command = "python benchmarks/repro/upcycling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    overrides = ["train.eval_every=0", 'train.eval_batches="none"', "train.checkpoint_every=0",
                 "train.keep_checkpoints=2", "train.log_every=50", 'train.progress="off"', "train.threads=1"]
    if args.max_chars:
        overrides.append(f"data.max_chars={args.max_chars}")
    base = load_run_config(args.config, overrides)
    rows: list[dict] = []
    t0 = time.perf_counter()
    data_src = None
    for seed in range(args.seeds):
        data_src = run_seed(seed, args, base, data_src, rows)
        write_results(rows, Path(args.out), args, command)
        log(f"seed {seed} finished; {time.perf_counter() - t0:.0f}s so far")
    log(f"wrote {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
