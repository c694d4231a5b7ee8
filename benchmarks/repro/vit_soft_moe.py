"""Soft MoE vs token choice vs expert choice vs dense in a small ViT on Fashion-MNIST, at equal training FLOPs per
image (Soft MoE paper, Puigcerver et al. 2023, figure 3 direction): does Soft MoE end with a lower test loss and a
higher test accuracy than the dense ViT, top-1 and top-2 token choice, and expert choice?

The paper's figure 3 puts Soft MoE on the best cost / quality front of ViTs on image classification, ahead of dense
ViTs, token choice and expert choice. An earlier run of this comparison (docs/RESULTS.md, "ViT: Soft MoE vs token
choice vs expert choice on Fashion-MNIST", ``benchmarks/vit_fashion_mnist.py``) had 16 tokens per image, about 2
epochs, every arm within one binomial standard error, and Soft MoE's combine weights nearly uniform (2.749 of
ln 16 = 2.773 nats) with its learned logit scale only at 1.03-1.29. This study changes three things:

- **More tokens:** 4x4 patches, 49 tokens per image, so a slot has tokens to choose among.
- **Longer training:** ``--epochs`` epochs (default 10) of the 60,000 training images, so that the dense model is
  capacity-limited rather than step-limited; a check of that is reported (below).
- **Soft MoE's router as the paper intends at this width:** its logits are ``scale * cos(token, slot parameter)``.
  The paper (section 2.3) L2-normalises tokens and slot parameters because the logits of LayerNorm'd tokens grow
  with the width d; the reference code starts ``scale`` at 1.0, which over the paper's hundreds of thousands of
  steps has room to grow. At d = 40 and a few thousand steps a scale of 1 keeps every logit within [-1, 1]: a
  dispatch softmax over 49 tokens can weigh no token more than e^2 = 7.4 times another, and the earlier study's
  scale barely moved. Here ``moe.router_scale_init = sqrt(d_model)``: the logits start with the spread (standard
  deviation about 1, for a random slot parameter) of the paper's un-normalised logits ``X @ Phi`` of LayerNorm'd
  tokens (norm sqrt(d)) and LeCun-initialised ``Phi`` (norm about 1), i.e. the layer starts as section 2.1's plain
  Soft MoE, and the normalisation still bounds the logits by the scale.

Arms (``configs/repro/vit49-*.toml``; 4 pre-norm blocks, d_model 40, 2 heads, d_ff 160, mean pooling, MoE in blocks 2
and 3, 7 experts in every MoE arm so that the sparse arms differ in routing, not in expert count; AdamW 2e-3, weight
decay 0.05, 100 warm-up steps, cosine to 0.1x, batch 128):

- ``dense``: d_ff 160 everywhere (80 k parameters);
- ``top1``: token choice top-1, experts of d_ff 160, capacity factor 1.25, batch-priority routing, c_B = 0.01;
- ``top2``: token choice top-2, experts of d_ff 80 (equal FLOPs), capacity factor 1.25, batch-priority routing;
- ``ec``: expert choice, experts of d_ff 160, c = 1 (each expert takes 49 x batch / 7 tokens);
- ``soft``: Soft MoE, 7 experts of d_ff 160 x 5 slots = 35 slots per image, scale initialised to sqrt(40). 35 slots
  and not 49: Soft MoE's logits, dispatch and combine cost FLOPs in proportion to the slots, and 35 bring the whole
  model to the dense model's training FLOPs (1.2 % over; 49 slots would be 12.6 % over).

Training FLOPs per image (``moekit.models.vit_flops_per_image``, routers included, a capacity factor's padding not)
are within 1.5 % of dense for every arm and printed in the table. Seeds are paired: seed s of every arm sees the same
batches. Reported: test loss and accuracy on all 10,000 test images after the last step, their means with 95 % t
intervals over seeds and the seed standard deviation, and the paired differences Soft MoE minus each other arm
(paper's side: negative for loss, positive for accuracy). A direction is "reproduced" when the interval excludes 0 on
the paper's side, "contradicted" when it excludes it on the other, otherwise "not resolved at this scale". For scale,
the binomial standard error of one run's accuracy on the 10,000 test images is printed too.

Is the dense model capacity-limited? Two checks on it, and one comparison:

(a) its training cross-entropy over the last epoch (the logged steps' batches, mean) is at least ``RATIO_MIN`` = 0.8
    of its final test loss: it fits the training images little better than unseen ones, so it is not over-fitting
    (the data are not what limits it);
(b) the last epoch improved its test loss by less than ``GAIN_MAX`` = 2 % of that loss: more steps buy little
    (with the caveat that the cosine schedule ends at a tenth of the learning rate, which also slows the last epoch);
(c) each MoE arm's training loss at the end minus dense's, paired by seed: below 0 when the extra parameters (at
    equal FLOPs) fit the training data better, which is what "capacity-limited" means.

Diagnostics, no paper side: the router entropy per token over training (``router_entropy`` in metrics.jsonl, the mean
over the two MoE layers; for Soft MoE the entropy of each token's combine weights over its 35 slots, ln 35 = 3.555
nats when uniform; for token choice and expert choice of the router softmax over 7 experts, ln 7 = 1.946), Soft
MoE's learned scale at the end per layer (read from the final checkpoint), and the mean drop fraction. The training
step of every arm is timed side by side in one process before the runs (``--time-rounds`` rounds; each round times one
step of every arm on the same batch, in a rotating order; medians after 3 warm-up rounds), reported as ratios to
dense: the runs' own clocks record how busy the machine was, so curves are plotted against steps, not seconds.

Budget (each study under about an hour on 2 cores): measured on this machine's 2 cores while both were busy with
two other training jobs, the CPU time of one training step of 128 images, the five arms interleaved on real batches
(one thread), was 201 ms (dense), 222 (top-1), 252 (top-2), 224 (expert choice) and 219 (Soft MoE); the earlier
study's dense ViT, interleaved with them, took 122 ms against the 56.3 ms it took with a free core, so a free core
runs these steps in about 93, 102, 116, 104 and 101 ms. A run of 4,690 steps, 10 evaluations of 10,000 images (about
3 s each) and its start-up take about 8.7 minutes, and 15 runs at 2 at a time about 65 minutes (70 with the last run
alone) on 2 free cores. The committed run took longer: on a 2-core AMD EPYC machine, mostly free, the side-by-side
steps took 181 (dense) to 214 ms, a run 14 to 24 minutes two at a time (the longer ones beside other measurements),
and the study 2 h 37 min; ``--epochs 5`` fits about an hour there. A larger machine can train longer
(``--epochs 30``) or run more seeds.

Soft MoE's scale, checked on a 63-step trial: the combine entropy stayed at 3.545-3.547 nats (of ln 35 = 3.555)
with the scale initialised to 1.0, and was 3.20-3.25 with sqrt(40).

Usage (runs in parallel, one thread each; Fashion-MNIST from ``apt-get install dataset-fashion-mnist`` or
``$MOEKIT_FASHION_MNIST``)::

    python benchmarks/repro/vit_soft_moe.py --out docs/results/vit_soft_moe [--runs runs/vit-soft-moe] [--jobs 2]
    python benchmarks/repro/vit_soft_moe.py --out docs/results/vit_soft_moe --section docs/RESULTS.md

Finished runs (``summary.json``) are skipped on a rerun; ``results.json``, ``runs.csv``, ``results.md`` and
``vit_soft_moe.png`` are written into ``--out``. ``--train-examples`` / ``--test-examples`` use only the first N
images (a quick trial; an epoch is then ``ceil(N / 128)`` steps).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import log, run_all, study_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "repro"
ARMS = ("dense", "top1", "top2", "ec", "soft")
RIVALS = ("dense", "top1", "top2", "ec")  # what Soft MoE is compared with
LABELS = {
    "dense": "dense",
    "top1": "top-1, CF 1.25",
    "top2": "top-2, CF 1.25",
    "ec": "expert choice, c = 1",
    "soft": "Soft MoE, 7 x 5 slots",
}
METRICS = (("test_loss", -1, "test loss"), ("test_accuracy", +1, "test accuracy"))  # (key, paper's side, words)
HEADING = "## Soft MoE vs token choice vs expert choice in a ViT (Soft MoE paper, figure 3)"
PLOT, PLOT_ALT = "vit_soft_moe.png", "test loss and accuracy over steps, paired differences, combine entropy, step time"
TRAIN_IMAGES, TEST_IMAGES, BATCH = 60_000, 10_000, 128
RATIO_MIN = 0.8  # check (a): training loss at the end / test loss
GAIN_MAX = 0.02  # check (b): last epoch's test-loss improvement / test loss
CURVE_POINTS = 80  # entropy points kept per run


def config_of(arm: str) -> str:
    return str(CONFIGS / f"vit49-{arm}.toml")


def epoch_steps(train_examples: int | None) -> int:
    """Steps of one epoch at batch 128: 469 for the 60,000 training images."""
    return math.ceil((TRAIN_IMAGES if train_examples is None else train_examples) / BATCH)


def log_every_for(steps_per_epoch: int) -> int:
    """The largest ``log_every`` up to 7 that divides an epoch, so that every evaluation falls on a logged step
    (7 for 469 = 7 x 67)."""
    return max(k for k in range(1, 8) if steps_per_epoch % k == 0)


def thin(points: list, n: int) -> list:
    """About ``n`` evenly spaced items of ``points``, the last always kept."""
    if len(points) <= n:
        return list(points)
    stride = math.ceil(len(points) / n)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


# -- runs --------------------------------------------------------------------------------------------------------
def overrides(seed: int, args: argparse.Namespace) -> list[str]:
    spe = epoch_steps(args.train_examples)
    data = [] if args.train_examples is None else [f"data.train_examples={args.train_examples}"]
    data += [] if args.test_examples is None else [f"data.test_examples={args.test_examples}"]
    return [
        *data,
        f"train.seed={seed}",
        f"train.max_steps={args.epochs * spe}",
        f"train.eval_every={spe}",
        f"train.log_every={log_every_for(spe)}",
        "train.checkpoint_every=0",
        "train.threads=1",
        "train.progress='off'",
    ]


def learned_scales(run_dir: str | Path) -> list[float] | None:
    """Soft MoE's learned logit scale of every MoE layer in the run's final checkpoint, in block order; None for a
    run without Soft MoE layers (or without a checkpoint)."""
    from safetensors.torch import load_file

    from moekit.training.checkpoint import list_checkpoints

    found = list_checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        return None
    weights = load_file(str(found[0] / "model.safetensors"))
    keys = sorted((k for k in weights if k.endswith("router.scale")), key=lambda k: int(k.split(".")[1]))
    return [float(weights[k]) for k in keys] or None


def row_of(arm: str, seed: int, run: dict, steps_per_epoch: int, uniform: float | None) -> dict:
    """What the study keeps of a finished run (:func:`_runs.run_one`'s result). ``uniform``: the router entropy of a
    uniform router of this arm (ln of its slots or experts), None for dense."""
    summary, records = run["summary"], run["records"]
    steps = summary["steps"]
    evals = [[r["step"], r["val_loss"], r["val_accuracy"]] for r in records if "val_loss" in r]
    last_epoch = [r for r in records if r["step"] > steps - steps_per_epoch]
    entropy = [[r["step"], r["router_entropy"]] for r in records if "router_entropy" in r]
    drops = [r["drop_fraction"] for r in records if "drop_fraction" in r]
    end_entropy = [r["router_entropy"] for r in last_epoch if "router_entropy" in r]
    end_logit = [r["max_router_logit"] for r in last_epoch if "max_router_logit" in r]
    return {
        "arm": arm,
        "seed": seed,
        "test_loss": summary["final_val_loss"],
        "test_accuracy": summary["final_val_accuracy"],
        "train_loss_end": statistics.fmean(r["ce_loss"] for r in last_epoch),
        "previous_test_loss": evals[-2][1] if len(evals) > 1 else None,
        "entropy_start": entropy[0][1] if entropy else None,
        "entropy_end": statistics.fmean(end_entropy) if end_entropy else None,
        "entropy_uniform": uniform,
        "max_logit_end": statistics.fmean(end_logit) if end_logit else None,
        "mean_drop_fraction": statistics.fmean(drops) if drops else 0.0,
        "scales": learned_scales(run["run_dir"]) if arm == "soft" else None,
        "parameters_total": summary.get("parameters_total"),
        "parameters_active": summary.get("parameters_active"),
        "train_flops_per_image": summary.get("train_flops_per_image"),
        "train_time_s": summary.get("train_time_s"),
        "steps": steps,
        "run_dir": run["run_dir"],
        "evals": evals,
        "entropy": thin(entropy, CURVE_POINTS),
    }


def uniform_entropy(arm: str) -> float | None:
    """ln of the choices a uniform router spreads a token over: Soft MoE's slots, the other arms' experts."""
    from moekit.lab.training.run_config import load_run_config

    moe = load_run_config(config_of(arm)).model.moe
    if moe is None:
        return None
    return math.log(moe.num_experts * getattr(moe, "slots_per_expert", 1))


def soft_scale_init() -> float:
    """The Soft MoE arm's ``moe.router_scale_init``."""
    from moekit.lab.training.run_config import load_run_config

    return load_run_config(config_of("soft")).model.moe.router_scale_init


def time_side_by_side(args: argparse.Namespace, rounds: int) -> dict:
    """Every arm's training step (the trainer's ``_train_step``: forward, backward, clipping, AdamW) timed in this
    process on one thread, round robin on the same batches (each round in a rotated order), so that every arm sees
    the same machine load; the first 3 rounds are warm-up. Medians and quartiles of the wall time in seconds per
    step, and the median CPU time of this process (the same on a free core; less than the wall time when the core is
    shared)."""
    import torch

    from moekit.lab.training.run_config import load_run_config
    from moekit.training.trainer import Trainer

    torch.set_num_threads(1)
    cfgs = {arm: load_run_config(config_of(arm), overrides(0, args)) for arm in ARMS}
    task = cfgs["dense"].task
    trainers, times, cpu = {}, {arm: [] for arm in ARMS}, {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        data = task.prepare(cfgs["dense"], Path(tmp), lambda m: None)  # every arm's [data] is the same
        source = task.batches(cfgs["dense"], data)
        batches = [source.next_batch() for _ in range(rounds + 3)]
        for arm, cfg in cfgs.items():
            torch.manual_seed(0)
            model = task.build_model(task.model_for_data(cfg, data))
            model.train()
            (Path(tmp) / arm).mkdir()
            trainers[arm] = Trainer(cfg.train, model, None, None, Path(tmp) / arm, log=lambda m: None)
        for r, (inputs, targets) in enumerate(batches):
            for arm in ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]:
                t0, c0 = time.perf_counter(), time.process_time()
                trainers[arm]._train_step(inputs, targets)
                if r >= 3:
                    times[arm].append(time.perf_counter() - t0)
                    cpu[arm].append(time.process_time() - c0)
    out = {}
    for arm, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        out[arm] = {"median_s": statistics.median(v), "q25_s": q[0], "q75_s": q[2], "n": len(v),
                    "cpu_median_s": statistics.median(cpu[arm])}
    return out


def study(args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    spe = epoch_steps(args.train_examples)
    timing = None
    if args.time_rounds > 0:
        log(f"timing the five training steps side by side, {args.time_rounds} rounds")
        timing = time_side_by_side(args, args.time_rounds)
        log("side by side: " + ", ".join(f"{a} {1e3 * t['median_s']:.1f} ms" for a, t in timing.items()))
    keys = [(arm, s) for s in range(args.seeds) for arm in ARMS]
    jobs = [(str(runs / f"{arm}-seed{s}"), config_of(arm), overrides(s, args)) for arm, s in keys]
    log(f"{len(jobs)} runs of {args.epochs * spe} steps, {args.jobs} at a time")
    done = run_all(jobs, None, args.jobs)
    uniform = {arm: uniform_entropy(arm) for arm in ARMS}
    rows = [row_of(arm, s, r, spe, uniform[arm]) for (arm, s), r in zip(keys, done, strict=True)]
    config = {k: v for k, v in vars(args).items() if k != "section"}
    config.update({"steps_per_epoch": spe, "steps": args.epochs * spe,
                   "test_images": TEST_IMAGES if args.test_examples is None else args.test_examples})
    return {"config": config, "rows": rows, "timing": timing}


# -- analysis ----------------------------------------------------------------------------------------------------
def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _paired(by: dict, key: str, a: str, b: str, seeds: list[int]) -> dict:
    d = [by[a, s][key] - by[b, s][key] for s in seeds]
    m, h = interval(d)
    return {"a": a, "b": b, "metric": key, "mean": m, "half": h, "per_seed": d}


def _curve(series: list[list[list[float]]], column: int) -> list[list[float]]:
    """``[step, mean, half]`` over runs at every step all of ``series`` (one ``[[step, value...], ...]`` per run)
    share; ``column``: the value's index in a point."""
    if not series:
        return []
    common = set.intersection(*({p[0] for p in run} for run in series))
    out = []
    for step in sorted(common):
        values = [next(p[column] for p in run if p[0] == step) for run in series]
        out.append([step, *interval(values)])
    return out


def analyse(result: dict) -> dict:
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["arm"], r["seed"]): r for r in rows}
    values = {key: {a: [by[a, s][key] for s in seeds] for a in ARMS} for key, _, _ in METRICS}
    means = {key: {a: interval(v) for a, v in per_arm.items()} for key, per_arm in values.items()}
    seed_sd = {key: {a: _sd(v) for a, v in per_arm.items()} for key, per_arm in values.items()}

    claims = []
    for rival in RIVALS:
        for key, side, words in METRICS:
            c = _paired(by, key, "soft", rival, seeds)
            paper = "negative (Soft MoE lower)" if side < 0 else "positive (Soft MoE higher)"
            claims.append({**c, "words": words, "paper": paper, "verdict": verdict(c["mean"], c["half"], side)})

    # Is the dense model capacity-limited? (a) training loss at the end against its test loss, (b) the last
    # epoch's test-loss gain, (c) what the MoE arms' extra parameters buy in training loss.
    dense = [by["dense", s] for s in seeds]
    ratio = [r["train_loss_end"] / r["test_loss"] for r in dense]
    gains = [(r["previous_test_loss"] - r["test_loss"]) / r["test_loss"] for r in dense
             if r["previous_test_loss"] is not None]
    capacity = {
        "train_loss_end": interval([r["train_loss_end"] for r in dense]),
        "test_loss": interval([r["test_loss"] for r in dense]),
        "ratio": interval(ratio),
        "ratio_ok": statistics.fmean(ratio) >= RATIO_MIN,
        "last_gain": interval([r["previous_test_loss"] - r["test_loss"] for r in dense
                               if r["previous_test_loss"] is not None]) if gains else (math.nan, math.nan),
        "relative_gain": interval(gains) if gains else (math.nan, math.nan),
        "gain_ok": bool(gains) and statistics.fmean(gains) < GAIN_MAX,
        "moe_minus_dense_train": [_paired(by, "train_loss_end", a, "dense", seeds) for a in ARMS[1:]],
    }
    capacity["limited"] = capacity["ratio_ok"] and capacity["gain_ok"]

    routing = {}
    for a in ARMS[1:]:
        ends = [by[a, s]["entropy_end"] for s in seeds if by[a, s]["entropy_end"] is not None]
        starts = [by[a, s]["entropy_start"] for s in seeds if by[a, s]["entropy_start"] is not None]
        logits = [by[a, s]["max_logit_end"] for s in seeds if by[a, s]["max_logit_end"] is not None]
        routing[a] = {
            "start": interval(starts) if starts else (math.nan, math.nan),
            "end": interval(ends) if ends else (math.nan, math.nan),
            "uniform": by[a, seeds[0]]["entropy_uniform"],
            "max_logit_end": interval(logits) if logits else (math.nan, math.nan),
            "drop_fraction": statistics.fmean(by[a, s]["mean_drop_fraction"] for s in seeds),
        }
    scales = [by["soft", s]["scales"] for s in seeds if by["soft", s].get("scales")]
    soft_scales = [interval([run[i] for run in scales]) for i in range(len(scales[0]))] if scales else []

    timing = result.get("timing")
    ratios = None
    if timing:
        base = timing["dense"]["median_s"]
        ratios = {a: timing[a]["median_s"] / base for a in ARMS}

    n_test = result["config"]["test_images"]
    p = means["test_accuracy"]["dense"][0]
    return {
        "seeds": seeds,
        "values": values,
        "means": means,
        "seed_sd": seed_sd,
        "claims": claims,
        "capacity": capacity,
        "routing": routing,
        "soft_scales": soft_scales,
        "time_ratios": ratios,
        "binomial_se": math.sqrt(p * (1 - p) / n_test),
        "loss_curves": {a: _curve([by[a, s]["evals"] for s in seeds], 1) for a in ARMS},
        "accuracy_curves": {a: _curve([by[a, s]["evals"] for s in seeds], 2) for a in ARMS},
        "entropy_curve": _curve([by["soft", s]["entropy"] for s in seeds], 1),
    }


# -- report ------------------------------------------------------------------------------------------------------
def _pm(m: float, h: float, digits: int = 4, sign: str = "") -> str:
    return f"{m:{sign}.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")


def _count(v: int | float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def render(result: dict, stats: dict) -> str:
    cfg = result["config"]
    rows = result["rows"]
    first = {a: next(r for r in rows if r["arm"] == a) for a in ARMS}
    n = len(stats["seeds"])
    timing = result.get("timing")
    lines = [
        HEADING,
        "",
        "```sh",
        "python benchmarks/repro/vit_soft_moe.py " + cfg["command"],
        "```",
        "",
        f"A 4-block ViT (d_model 40, 2 heads, 28x28 Fashion-MNIST images in 4x4 patches = 49 tokens, mean pooling), "
        f"MoE in blocks 2 and 3 with 7 experts in every MoE arm; {cfg['epochs']} epochs = {cfg['steps']:,} steps of "
        f"128 images, AdamW 2e-3 (one learning rate for every arm, not swept), cosine to 0.1x; {n} seeds per arm, "
        "paired by seed (the same batches). Soft MoE's router scale starts at sqrt(40) = 6.32 (logits of the "
        "spread of the paper's un-normalised ones at this width; the reference's 1.0 keeps them within [-1, 1]). "
        f"Test loss (nats/image) and accuracy on the {cfg['test_images']:,} test images after the last step: mean and "
        "95 % t interval over seeds; the seed standard deviation is the noise of one run. Training FLOPs per image "
        "count the routers (a capacity factor's padding is not counted).",
        "",
        "| arm | parameters (total / active) | train MFLOP / image | test loss | seed sd | test accuracy | seed sd | "
        "drop fraction | step time / dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in ARMS:
        r = first[a]
        flops = r.get("train_flops_per_image")
        ratio = "-" if stats["time_ratios"] is None else f"{stats['time_ratios'][a]:.2f}"
        drop = "-" if a == "dense" else f"{stats['routing'][a]['drop_fraction']:.3f}"
        lines.append(
            f"| {LABELS[a]} | {_count(r.get('parameters_total'))} / {_count(r.get('parameters_active'))} | "
            f"{'-' if flops is None else f'{flops / 1e6:.2f}'} | {_pm(*stats['means']['test_loss'][a])} | "
            f"{stats['seed_sd']['test_loss'][a]:.4f} | {_pm(*stats['means']['test_accuracy'][a])} | "
            f"{stats['seed_sd']['test_accuracy'][a]:.4f} | {drop} | {ratio} |"
        )
    lines += [
        "",
        f"For scale: the binomial standard error of one run's accuracy on {cfg['test_images']:,} test images at the "
        f"dense mean is {stats['binomial_se']:.4f}.",
        "",
        "Paired differences, Soft MoE minus each arm (same seed):",
        "",
        "| difference | metric | mean ± 95 % | per seed | paper's side | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in stats["claims"]:
        per_seed = ", ".join(f"{d:+.4f}" for d in c["per_seed"])
        lines.append(
            f"| Soft MoE - {LABELS[c['b']]} | {c['words']} | {_pm(c['mean'], c['half'], sign='+')} | {per_seed} | "
            f"{c['paper']} | {c['verdict']} |"
        )
    cap = stats["capacity"]
    yes = {True: "yes", False: "no"}
    percent = _pm(100 * cap["relative_gain"][0], 100 * cap["relative_gain"][1], 2)
    lines += [
        "",
        "Is the dense model capacity-limited? (a) its training cross-entropy over the last epoch (mean of the logged "
        f"batches) is at least {RATIO_MIN} of its final test loss, so it is not over-fitting: "
        f"{_pm(*cap['train_loss_end'])} against {_pm(*cap['test_loss'])}, ratio {_pm(*cap['ratio'], digits=3)} "
        f"({yes[cap['ratio_ok']]}); (b) the last epoch improved its test loss by less than {100 * GAIN_MAX:.0f} % "
        f"of it: by {_pm(*cap['last_gain'])} nats, {percent} % ({yes[cap['gain_ok']]}; the cosine schedule's low "
        "final learning rate slows the last epoch too). "
        f"Both: {'plausibly capacity-limited' if cap['limited'] else 'not shown to be capacity-limited'}. "
        "(c) What the MoE arms' extra parameters buy at equal FLOPs, training loss at the end minus dense's, paired "
        "by seed (below 0: they fit the training images better):",
        "",
        "| arm | training loss at the end minus dense's |",
        "|---|---|",
    ]
    for c in cap["moe_minus_dense_train"]:
        lines.append(f"| {LABELS[c['a']]} | {_pm(c['mean'], c['half'], sign='+')} |")
    lines += [
        "",
        "Routing diagnostics (no paper side): router entropy per token, mean over the two MoE layers (Soft MoE: of "
        "its combine weights over the 35 slots; token and expert choice: of the router softmax over 7 experts), at "
        "the first logged step and over the last epoch, against a uniform router; the largest logit over the last "
        "epoch (Soft MoE's is bounded by its scale).",
        "",
        "| arm | entropy, first logged step | entropy, last epoch | uniform | largest logit, last epoch |",
        "|---|---|---|---|---|",
    ]
    for a in ARMS[1:]:
        g = stats["routing"][a]
        uni = "-" if g["uniform"] is None else f"{g['uniform']:.3f}"
        lines.append(f"| {LABELS[a]} | {_pm(*g['start'], digits=3)} | {_pm(*g['end'], digits=3)} | {uni} | "
                     f"{_pm(*g['max_logit_end'], digits=2)} |")
    if stats["soft_scales"]:
        text = ", ".join(f"block {b}: {_pm(m, h, digits=2)}" for b, (m, h) in zip((2, 3), stats["soft_scales"],
                                                                                   strict=False))
        lines += ["", f"Soft MoE's learned scale at the end (initialised to {soft_scale_init():.2f}): {text}."]
    if timing:
        lines += [
            "",
            "Training-step time, every arm side by side in one process (forward, backward, clipping, AdamW on the "
            f"same batch of 128, one thread, {timing['dense']['n']} rounds in rotating order after 3 warm-up rounds; "
            "median and quartiles). The curves are plotted against steps, not the runs' own clocks, which record how "
            "busy the machine was while each ran:",
            "",
            "| arm | ms per step (quartiles) | / dense | CPU ms per step |",
            "|---|---|---|---|",
        ]
        for a in ARMS:
            t = timing[a]
            cpu_ms = f"{1e3 * t['cpu_median_s']:.1f}" if "cpu_median_s" in t else "-"
            lines.append(f"| {LABELS[a]} | {1e3 * t['median_s']:.1f} ({1e3 * t['q25_s']:.1f}-{1e3 * t['q75_s']:.1f})"
                         f" | {stats['time_ratios'][a]:.2f} | {cpu_ms} |")
    lines += ["", f"![{PLOT_ALT}]({PLOT})"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    rows = [{**{k: v for k, v in r.items() if k != "scales" and not isinstance(v, list)},
             "scales": "" if not r.get("scales") else ";".join(f"{x:.4f}" for x in r["scales"])}
            for r in result["rows"]]
    write_outputs(out, result, stats, render(result, stats), rows)
    plot(stats, out / PLOT)


def plot(stats: dict, path: Path) -> None:
    """Top: test loss and accuracy against step (mean and 95 % band over seeds), Soft MoE's combine entropy against
    step. Bottom: the claims (Soft MoE minus each arm, paired by seed, loss and accuracy) and the side-by-side step
    time ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dense": "black", "top1": "tab:blue", "top2": "tab:orange", "ec": "tab:green", "soft": "tab:red"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    (loss_ax, acc_ax, ent_ax), (dloss_ax, dacc_ax, time_ax) = axes

    def band(ax, pts, colour, label):
        if not pts:
            return
        xs = [p[0] for p in pts]
        ms = [p[1] for p in pts]
        hs = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
        ax.plot(xs, ms, color=colour, marker="o", ms=3, label=label)
        ax.fill_between(xs, [m - h for m, h in zip(ms, hs, strict=True)], [m + h for m, h in zip(ms, hs, strict=True)],
                        color=colour, alpha=0.2, lw=0)

    for a in ARMS:
        band(loss_ax, stats["loss_curves"][a], colours[a], LABELS[a])
        band(acc_ax, stats["accuracy_curves"][a], colours[a], LABELS[a])
    loss_ax.set_ylabel("test loss (nats / image)")
    acc_ax.set_ylabel("test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("training step (128 images)")
        ax.set_title("mean and 95 % band over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    band(ent_ax, stats["entropy_curve"], colours["soft"], "Soft MoE combine entropy (mean, 95 % band)")
    uniform = stats["routing"]["soft"]["uniform"]
    if uniform is not None:
        ent_ax.axhline(uniform, color="grey", ls="--", lw=1, label=f"uniform over the slots (ln 35 = {uniform:.3f})")
    ent_ax.set_xlabel("training step (128 images)")
    ent_ax.set_ylabel("entropy of a token's combine weights (nats)")
    ent_ax.set_title("mean over the two Soft MoE layers")
    ent_ax.grid(alpha=0.3)
    ent_ax.legend(fontsize=8)

    for ax, key, side in ((dloss_ax, "test_loss", "below 0"), (dacc_ax, "test_accuracy", "above 0")):
        cs = [c for c in stats["claims"] if c["metric"] == key]
        xs = list(range(len(cs)))
        ax.errorbar(xs, [c["mean"] for c in cs], yerr=[0.0 if math.isnan(c["half"]) else c["half"] for c in cs],
                    color="tab:purple", marker="o", capsize=3, ls="none", label="mean, 95 % interval over seeds")
        for i, c in enumerate(cs):
            ax.scatter([i] * len(c["per_seed"]), c["per_seed"], color="grey", s=10, zorder=3,
                       label="per seed" if i == 0 else None)
        ax.axhline(0.0, color="black", lw=1)
        ax.set_xticks(xs, [f"minus\n{LABELS[c['b']]}" for c in cs], fontsize=8)
        ax.set_ylabel(f"Soft MoE {key.replace('_', ' ')} minus the arm's")
        ax.set_title(f"paired by seed; {side}: Soft MoE better (the paper's side)")
        ax.legend(fontsize=8)

    if stats["time_ratios"] is not None:
        xs = list(range(len(ARMS)))
        time_ax.bar(xs, [stats["time_ratios"][a] for a in ARMS], color=[colours[a] for a in ARMS])
        time_ax.axhline(1.0, color="black", lw=1)
        time_ax.set_xticks(xs, [LABELS[a].replace(", ", "\n") for a in ARMS], fontsize=8)
        time_ax.set_ylabel("training-step time / dense (side by side, median)")
        time_ax.set_title("equal FLOPs, unequal time: one process, one thread")
    else:
        time_ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json, runs.csv, results.md and the plot")
    p.add_argument("--runs", default="runs/vit-soft-moe", help="where the run directories go")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="epochs of the training images (469 steps each)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--time-rounds", type=int, default=30, help="side-by-side timed steps per arm (0: none)")
    p.add_argument("--train-examples", type=int, help="use only the first N training images (a quick trial)")
    p.add_argument("--test-examples", type=int, help="use only the first N test images (a quick trial)")
    p.add_argument("--section", help="write the RESULTS.md section from --out's results and exit")
    return study_main(p, argv, HEADING, study, lambda result, args: write(result, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
