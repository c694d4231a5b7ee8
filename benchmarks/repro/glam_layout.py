"""GLaM layout (GLaM; ST-MoE's placement): does a top-2 MoE in every other block, and one in every fourth block, beat
the dense model of the same training FLOPs per token when every model trains at its own best learning rate?

GLaM (ALGORITHMS.md section 7): a top-2 MoE in every other layer beats the dense model at matched active FLOPs;
ST-MoE puts the MoE in every fourth layer instead (section 6). The directions checked here, each paired by seed:

1. the final validation loss of ``every2`` minus its FLOP-matched dense model ``dense-every2`` (paper's side:
   negative, the MoE lower);
2. ``every4`` minus ``dense-every4`` (paper's side: negative).

Reported without a paper side (section 7 gives no figure comparing the two layouts, and the two are not matched in
FLOPs: every2 costs about 8 % more per token): ``every2 - every4``, and ``dense-every2 - dense-every4``, the check on
the baseline that the earlier GLaM-layout section lacked (there the FLOP-matched dense model, FFNs widened from 256
to 512, ended above a cheaper 256-wide dense model and was never tuned: a weak baseline).

Arms: ``configs/repro/glam-every2.toml`` (a 4-block decoder, d_model 64, d_ff 256; top-2 of 8 experts of d_ff 256
with renormalised gates, no jitter, c_B = 1e-2, no z-loss, in blocks 1 and 3), ``glam-every4.toml`` (the same in
block 3 only), and their dense models ``glam-dense.toml`` and ``glam-dense-every4.toml`` (``flop_matched_dense``: the
FFN of each MoE block becomes one dense FFN of 2 x 256 = 512, the two experts a token visits). Every MoE run is
dropless (``moe.capacity_factor = none``): every token visits exactly two experts, so the FLOP match holds for every
token and dropped tokens do not confound the comparison. Before training, the script checks with
``moekit.models.flops_per_token`` and ``parameter_counts`` that each MoE arm's training FLOPs per token exceed its
dense model's by exactly the router matmul (6 x 8 x 64 FLOPs per MoE block: 0.24 % for every2, 0.13 % for every4);
the table prints both. Depth: 4 blocks (``--layers``), as in the configs. The two layouts differ there in what
they are about, the share of FFNs that are MoE (2 of 4 against 1 of 4); 8 blocks would repeat each pattern twice
but cost about 1.6x the CPU time per step (measured below), about 300 instead of 500 steps in the hour.

1. **Sweep.** Every arm at each learning rate of ``--lrs`` (AdamW, 50 warm-up steps, cosine decay), ``--sweep-seeds``
   seeds, ``--sweep-steps`` steps (default: ``--steps``). Each arm's learning rate is the one with the lowest mean
   final validation loss over the sweep seeds (a tie goes to the lower rate; a non-finite loss counts as infinite).
   The dense models get the same sweep as the MoE arms. An arm whose best rate is at an end of the grid is flagged
   in the report (its optimum may lie outside).
2. **Arms.** Every arm at its own rate, ``--seeds`` seeds, paired (seed s of every arm sees the same batches and
   starts from the same embedding and block 0). Seeds below ``--sweep-seeds`` are the sweep's runs when the step
   counts match (the same run directory; finished runs are kept).
3. **Read.** Validation loss on the whole held-out split at the end; paired differences with 95 % t intervals. A
   direction is "reproduced" when the interval excludes 0 on the paper's side, "contradicted" when it excludes it on
   the other, otherwise "not resolved at this scale". The seed standard deviation of each arm is printed.

Every run on ``data.corpus = "mixed"`` (docs/DATA.md 3.3; one tokenizer and one token split shared by every run),
``--steps`` steps of 16 x 128 = 2,048 tokens.

Budget. CPU time per training step (forward, backward, clipping and AdamW on one 16 x 128 batch, one thread, 30
steps after 3 warm-up steps, measured while two other training processes and a test suite shared the 2 cores):
4 blocks, dropless: every2 0.280 s, dense-every2 0.263 s, every4 0.282 s, dense-every4 0.231 s; 8 blocks
(capacity factor 1.25): every2 0.457 s, dense-every2 0.444 s, every4 0.424 s, dense-every4 0.388 s. With the
defaults the study trains 4 arms x 3 rates x 2 seeds = 24 sweep runs and 4 arms x 3 more seeds = 12 more runs of
500 steps, each about 500 x 0.26 s + about 30 s for the evaluation of the whole held-out split, the unigram baseline
and the run's plots: the first run alone (it prepares the data), then 35 runs 2 at a time, about 50 minutes on 2
free cores.

Usage (runs in parallel, one thread each)::

    python benchmarks/repro/glam_layout.py --out docs/results/glam_layout [--runs runs/glam-layout] [--jobs 2]
    python benchmarks/repro/glam_layout.py --out docs/results/glam_layout --section docs/RESULTS.md

Finished runs (``summary.json``) are skipped on a rerun; ``results.json``, ``runs.csv``, ``results.md`` and
``loss.png`` are written into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, log, run_all, study_main, study_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "repro"
ARMS = ("every2", "dense-every2", "every4", "dense-every4")
CONFIG = {
    "every2": "glam-every2.toml",
    "dense-every2": "glam-dense.toml",
    "every4": "glam-every4.toml",
    "dense-every4": "glam-dense-every4.toml",
}
MATCHED = {"every2": "dense-every2", "every4": "dense-every4"}  # each MoE arm's FLOP-matched dense model
EVERY = {"every2": 2, "dense-every2": 2, "every4": 4, "dense-every4": 4}
HEADING = "## GLaM layout: top-2 MoE every other / every fourth block vs LR-tuned dense (GLaM, ST-MoE)"
PLOT, PLOT_ALT = "loss.png", "loss, GLaM layout (learning-rate sweep; paired differences)"


def blocks_of(arm: str, layers: int) -> list[int]:
    """The blocks whose FFN is the MoE (dense arms: the 512-wide FFN): the last of every ``EVERY[arm]``."""
    return [i for i in range(layers) if i % EVERY[arm] == EVERY[arm] - 1]


# -- runs --------------------------------------------------------------------------------------------------------
def overrides(arm: str, lr: float, seed: int, steps: int, args: argparse.Namespace) -> list[str]:
    moe = ["moe.capacity_factor='none'"] if arm in MATCHED else []
    return [
        *data_overrides(args),
        *moe,
        f"model.n_layers={args.layers}",
        f"train.lr={lr}",
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        "train.eval_batches='none'",
        "train.checkpoint_every=0",
        "train.threads=1",
        "train.progress='off'",
    ]


def job(arm: str, lr: float, seed: int, steps: int, args: argparse.Namespace) -> tuple[str, str, list[str]]:
    run_dir = Path(args.runs) / f"{arm}-lr{lr:g}-steps{steps}-seed{seed}"
    return str(run_dir), str(CONFIGS / CONFIG[arm]), overrides(arm, lr, seed, steps, args)


def flop_check(args: argparse.Namespace) -> list[dict]:
    """Per MoE arm: its training FLOPs per token and its dense model's (the configs with this study's overrides,
    ``data.vocab_size`` as the vocabulary); raises unless the two differ by exactly the router matmul and the MoE
    (wide-FFN) blocks are :func:`blocks_of`'s."""
    from moekit.lab.training.run_config import load_run_config
    from moekit.models import flops_per_token, parameter_counts

    out = []
    for arm, dense in MATCHED.items():
        cfg = {a: load_run_config(str(CONFIGS / CONFIG[a]), overrides(a, 1e-3, 0, 100, args)) for a in (arm, dense)}
        moe_c, dense_c = cfg[arm].model, cfg[dense].model
        seq = cfg[arm].data.seq_len
        layers = [i for i in range(moe_c.n_layers) if moe_c.is_moe_layer(i)]
        wide = [i for i in range(dense_c.n_layers) if dense_c.dense_d_ff(i) == moe_c.moe.top_k * moe_c.moe.d_ff]
        router = len(layers) * moe_c.moe.num_experts * moe_c.d_model  # router matmul parameters
        f_moe, f_dense = flops_per_token(moe_c, seq)["train"], flops_per_token(dense_c, seq)["train"]
        active = parameter_counts(moe_c)["active"] - parameter_counts(dense_c)["active"]
        if layers != blocks_of(arm, args.layers) or wide != layers or active != router or f_moe - f_dense != 6 * router:
            raise ValueError(
                f"{dense} is not the FLOP-matched dense model of {arm}: MoE blocks {layers}, wide FFNs {wide}, "
                f"train FLOPs/token {f_moe:,} vs {f_dense:,} (router {6 * router:,})"
            )
        out.append(
            {
                "arm": arm,
                "dense": dense,
                "moe_blocks": layers,
                "train_flops_moe": f_moe,
                "train_flops_dense": f_dense,
                "router_train_flops": 6 * router,
            }
        )
    return out


def row_of(arm: str, lr: float, seed: int, steps: int, run: dict) -> dict:
    """What the study keeps of a finished run (:func:`_runs.run_one`'s result)."""
    summary, records = run["summary"], run["records"]
    drops = [r["drop_fraction"] for r in records if "drop_fraction" in r]
    return {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "final_val_loss": summary["final_val_loss"],
        "unigram_val_loss": summary.get("unigram_val_loss"),
        "mean_drop_fraction": statistics.fmean(drops) if drops else 0.0,
        "parameters_total": summary.get("parameters_total"),
        "parameters_active": summary.get("parameters_active"),
        "train_flops_per_token": summary.get("train_flops_per_token"),
        "train_time_s": summary.get("train_time_s"),
        "run_dir": run["run_dir"],
    }


def _finite(loss: float | None) -> float:
    return loss if loss is not None and math.isfinite(loss) else math.inf


def best_lr(rows: list[dict], arm: str) -> float:
    """The learning rate of ``rows`` (sweep runs) with the lowest mean final validation loss of ``arm`` over its
    seeds; a tie goes to the lower rate, a non-finite (or missing) loss counts as infinite."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if r["arm"] == arm:
            by_lr.setdefault(r["lr"], []).append(_finite(r["final_val_loss"]))
    if not by_lr:
        raise ValueError(f"no sweep runs of {arm}")
    return min(sorted(by_lr), key=lambda lr: statistics.fmean(by_lr[lr]))  # min keeps the first (lowest) of a tie


def study(args: argparse.Namespace) -> dict:
    lrs = sorted(args.lrs)
    sweep_steps = args.sweep_steps or args.steps
    flops = flop_check(args)
    first = job(ARMS[0], lrs[0], 0, sweep_steps, args)
    log(f"preparing the data with {first[0]}")
    run_all([first], None, 1)
    src = first[0]

    keys = [(arm, lr, s) for s in range(args.sweep_seeds) for lr in lrs for arm in ARMS]
    log(f"sweep: {len(keys)} runs (lr {lrs}, seeds {list(range(args.sweep_seeds))}, {sweep_steps} steps)")
    done = run_all([job(arm, lr, s, sweep_steps, args) for arm, lr, s in keys], src, args.jobs)
    sweep = [row_of(arm, lr, s, sweep_steps, r) for (arm, lr, s), r in zip(keys, done, strict=True)]
    lr_of = {arm: best_lr(sweep, arm) for arm in ARMS}
    log("learning rates: " + ", ".join(f"{a} {lr_of[a]:g}" for a in ARMS))

    keys = [(arm, s) for s in range(args.seeds) for arm in ARMS]
    log(f"arms: {len(keys)} runs ({args.steps} steps; those the sweep ran are kept)")
    done = run_all([job(arm, lr_of[arm], s, args.steps, args) for arm, s in keys], src, args.jobs)
    rows = [row_of(arm, lr_of[arm], s, args.steps, r) for (arm, s), r in zip(keys, done, strict=True)]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "section"},
        "flops": flops,
        "lr": lr_of,
        "sweep": sweep,
        "rows": rows,
    }


# -- analysis ----------------------------------------------------------------------------------------------------
def analyse(result: dict) -> dict:
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    loss = {(r["arm"], r["seed"]): r["final_val_loss"] for r in rows}
    per_arm = {a: [loss[a, s] for s in seeds] for a in ARMS}
    means = {a: interval(per_arm[a]) for a in ARMS}
    spread = {a: statistics.stdev(per_arm[a]) if len(seeds) > 1 else math.nan for a in ARMS}
    drops = {a: statistics.fmean(r["mean_drop_fraction"] for r in rows if r["arm"] == a) for a in ARMS}

    def paired(a: str, b: str, paper: str | None = None, why: str = "") -> dict:
        d = [loss[a, s] - loss[b, s] for s in seeds]
        m, h = interval(d)
        c = {"a": a, "b": b, "mean": m, "half": h, "per_seed": d}
        if paper is not None:
            c.update({"paper": f"{paper} ({why})", "verdict": verdict(m, h, -1 if paper == "negative" else +1)})
        return c

    why = "the MoE lower than its FLOP-matched dense model"
    claims = [paired(arm, dense, "negative", why) for arm, dense in MATCHED.items()]
    reported = [paired("every2", "every4"), paired("dense-every2", "dense-every4")]

    # The sweep: per arm and learning rate, the mean final loss over the sweep seeds and its interval.
    lrs = sorted({r["lr"] for r in result["sweep"]})
    sweep = []
    for a in ARMS:
        for lr in lrs:
            values = [_finite(r["final_val_loss"]) for r in result["sweep"] if r["arm"] == a and r["lr"] == lr]
            if values:
                m, h = interval(values) if all(map(math.isfinite, values)) else (math.inf, math.nan)
                sweep.append({"arm": a, "lr": lr, "mean": m, "half": h, "losses": values})
    edge = {a: result["lr"][a] in (lrs[0], lrs[-1]) and len(lrs) > 1 for a in ARMS}
    return {
        "seeds": seeds,
        "means": means,
        "seed_sd": spread,
        "drops": drops,
        "claims": claims,
        "reported": reported,
        "loss": per_arm,
        "lrs": lrs,
        "sweep": sweep,
        "lr": dict(result["lr"]),
        "lr_at_edge": edge,
    }


# -- report ------------------------------------------------------------------------------------------------------
def _pm(m: float, h: float, digits: int = 4) -> str:
    if math.isinf(m):
        return "diverged"
    return f"{m:.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")


def _diff(c: dict) -> str:
    return f"{c['mean']:+.4f}" + ("" if math.isnan(c["half"]) else f" ± {c['half']:.4f}")


def _seeds(k: int) -> str:
    return f"{k} seed" + ("" if k == 1 else "s")


def _count(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def render(result: dict, stats: dict) -> str:
    cfg = result["config"]
    rows = result["rows"]
    first = {a: next(r for r in rows if r["arm"] == a) for a in ARMS}
    flops = {a: first[a].get("train_flops_per_token") for a in ARMS}
    n = len(stats["seeds"])
    sweep_steps = cfg.get("sweep_steps") or cfg["steps"]
    unigram = first[ARMS[0]].get("unigram_val_loss")
    lines = [
        HEADING,
        "",
        "```sh",
        "python benchmarks/repro/glam_layout.py " + cfg["command"],
        "```",
        "",
        f"A {cfg['layers']}-block decoder (d_model 64, d_ff 256); MoE arms top-2 of 8 experts of d_ff 256 (gates "
        "renormalised), dropless, in the blocks listed; each dense arm is its MoE arm's FLOP-matched dense model (the "
        "FFN of those blocks 512 wide). Every arm trains at its own learning rate, the best of the sweep below by "
        f"mean final validation loss over {_seeds(cfg['sweep_seeds'])} ({sweep_steps} steps; AdamW, 50 warm-up steps, "
        f"cosine). Then {n} seeds per arm at that rate (paired by seed: the same batches, embedding and first "
        f'block), {cfg["steps"]} steps of 16 x 128 tokens on data.corpus = "{cfg["corpus"]}". Validation loss on '
        "the whole held-out split at the end (nats/token; mean and 95 % interval over seeds; the seed standard "
        "deviation is the noise of one run)"
        + ("." if unigram is None else f"; the unigram model's loss there is {unigram:.4f}."),
        "",
        "Learning-rate sweep (validation loss, mean ± 95 % interval over the sweep seeds; chosen rate in bold):",
        "",
        "| arm | " + " | ".join(f"lr {lr:g}" for lr in stats["lrs"]) + " |",
        "|---|" + "---|" * len(stats["lrs"]),
    ]
    cell = {(e["arm"], e["lr"]): _pm(e["mean"], e["half"]) for e in stats["sweep"]}
    for a in ARMS:
        cells = []
        for lr in stats["lrs"]:
            text = cell.get((a, lr), "-")
            cells.append(f"**{text}**" if lr == stats["lr"][a] else text)
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| arm | MoE (dense: 512-wide FFN) in blocks | lr | parameters | train FLOPs / token | validation loss | "
        "seed sd | drops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in ARMS:
        m, h = stats["means"][a]
        blocks = ", ".join(map(str, blocks_of(a, cfg["layers"])))
        lines.append(
            f"| {a} | {blocks} | {stats['lr'][a]:g} | {_count(first[a].get('parameters_total'))} | "
            f"{_count(flops[a])} | {_pm(m, h)} | {stats['seed_sd'][a]:.4f} | {stats['drops'][a]:.3f} |"
        )
    lines += [
        "",
        "Paired differences of the final validation loss (first minus second, same seed); training FLOPs per token "
        "of the first and the second (the MoE's excess is its router matmul):",
        "",
        "| difference | train FLOPs / token | mean ± 95 % | paper's side | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in stats["claims"]:
        lines.append(
            f"| {c['a']} - {c['b']} | {_count(flops[c['a']])} vs {_count(flops[c['b']])} | {_diff(c)} | "
            f"{c['paper']} | {c['verdict']} |"
        )
    lines += [
        "",
        "Reported without a paper side (not matched in FLOPs; the second row checks the dense baseline: positive "
        "means the wider, costlier dense model ends worse than the narrower one):",
        "",
        "| difference | train FLOPs / token | mean ± 95 % |",
        "|---|---|---|",
    ]
    for c in stats["reported"]:
        lines.append(f"| {c['a']} - {c['b']} | {_count(flops[c['a']])} vs {_count(flops[c['b']])} | {_diff(c)} |")
    edge = [a for a in ARMS if stats["lr_at_edge"][a]]
    if edge:
        lines += [
            "",
            f"The best rate of {', '.join(edge)} is at an end of the sweep; the optimum may lie outside it.",
        ]
    lines += ["", f"![{PLOT_ALT}]({PLOT})"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    rows = [{"phase": "sweep" if phase == "sweep" else "main", **r}
            for phase in ("sweep", "rows") for r in result[phase]]
    write_outputs(out, result, stats, render(result, stats), rows)
    plot(stats, out / PLOT, result["rows"][0].get("unigram_val_loss"))


COLOURS = {"every2": "tab:blue", "dense-every2": "tab:blue", "every4": "tab:orange", "dense-every4": "tab:orange"}


def plot(stats: dict, path: Path, unigram: float | None) -> None:
    """Left: the sweep, final validation loss against the learning rate per arm (mean and 95 % interval over the
    sweep seeds, each seed a dot; a dense model dashed in its MoE arm's colour), and each arm's main result at its
    rate (a hollow square, MoE, or diamond, dense: mean and 95 % interval over all seeds); right: the claims, MoE
    minus dense paired by seed, and the reported differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, a in enumerate(ARMS):
        pts = [e for e in stats["sweep"] if e["arm"] == a and math.isfinite(e["mean"])]
        shift = 1 + 0.03 * (i - 1.5)  # side by side on the log axis
        xs = [e["lr"] * shift for e in pts]
        left.errorbar(
            xs,
            [e["mean"] for e in pts],
            yerr=[0.0 if math.isnan(e["half"]) else e["half"] for e in pts],
            color=COLOURS[a],
            marker="o",
            ms=4,
            capsize=3,
            lw=1,
            ls="--" if a.startswith("dense") else "-",
            label=f"{a}: sweep ({_seeds(len(pts[0]['losses']) if pts else 0)})",
        )
        for x, e in zip(xs, pts, strict=True):
            left.scatter([x] * len(e["losses"]), e["losses"], color=COLOURS[a], s=8, alpha=0.5)
        m, h = stats["means"][a]
        left.errorbar(
            [stats["lr"][a] * shift],
            [m],
            yerr=[0.0 if math.isnan(h) else h],
            color=COLOURS[a],
            marker="D" if a.startswith("dense") else "s",
            ms=8,
            mfc="none",
            capsize=4,
            label=f"{a}: at its rate ({_seeds(len(stats['seeds']))})",
        )
    if unigram is not None:
        left.axhline(unigram, color="grey", ls="--", lw=1, label="unigram (validation)")
    left.set_xscale("log")
    left.set_xlabel("learning rate (AdamW, log scale)")
    left.set_ylabel("final validation loss (nats / token)")
    left.set_title("mean and 95 % interval over seeds")
    left.legend(fontsize=7)

    diffs = stats["claims"] + stats["reported"]
    xs = list(range(len(diffs)))
    for x, c in zip(xs, diffs, strict=True):
        colour = "tab:purple" if "verdict" in c else "tab:grey"
        right.errorbar(
            [x], [c["mean"]], yerr=[0.0 if math.isnan(c["half"]) else c["half"]], color=colour, marker="o", capsize=4
        )
        right.scatter([x + 0.1] * len(c["per_seed"]), c["per_seed"], color=colour, s=10, alpha=0.5)
    right.errorbar([], [], color="tab:purple", marker="o", label="MoE minus its FLOP-matched dense (95 % interval)")
    right.errorbar([], [], color="tab:grey", marker="o", label="reported, no paper side")
    right.scatter([], [], color="black", s=10, alpha=0.5, label="one seed")
    right.axhline(0.0, color="black", lw=1)
    right.set_xticks(xs, [f"{c['a']}\n- {c['b']}" for c in diffs], fontsize=8)
    right.set_ylabel("final validation loss difference (nats / token)")
    right.set_title("below 0: the first better (GLaM's side for MoE - dense)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "runs/glam-layout", seeds=5, steps=500)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--sweep-seeds", type=int, default=2)
    p.add_argument("--sweep-steps", type=int, help="steps of the sweep runs (default: --steps, so they are reused)")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks of every arm")
    return study_main(p, argv, HEADING, study, lambda result, args: write(result, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
