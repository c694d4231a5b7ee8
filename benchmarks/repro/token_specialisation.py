"""Token specialisation against null routings (ST-MoE section 7): how much does a trained top-1 router's choice of
expert tell about the token it routes, against the same model untrained and against a random token-to-expert hash
with the trained loads?

An earlier analysis (docs/RESULTS.md, "Routing analysis and distillation") compared routing with label shuffling,
which only tests independence: any router driven by the token embedding beats it, trained or not. Here the figure is
the mutual information I(token id; expert) in bits, per MoE layer, on the first ``--tokens`` validation tokens (whole
windows of 128, 16 per call as in training), of three routings of the same tokens per seed:

- **trained**: the final checkpoint's top-1 expert of each token (the router's choice);
- **untrained** (null 1): the same run's checkpoint at step 0 (``checkpoints/step_00000000``, written by the trainer
  before the first step: the architecture and seed at initialisation), routing the same tokens;
- **hash** (null 2): a random map from token id to expert (each distinct id wholly to one expert) whose loads are the
  trained layer's on these tokens, ``moekit.analysis.stats.load_matched_hash``: the distinct ids in a random order
  are laid end to end, each as long as its count, and cut at the trained cumulative loads, an id going to the expert
  whose stretch holds its midpoint. Loads then match up to the ids straddling a cut (the largest deviation is
  reported); sampling an expert per id with probability proportional to the loads would match them only in
  expectation, with deviations of several per cent from the frequent ids (`` the``, ``,``) alone. The mean of
  ``--hash-draws`` draws per layer (seeded by seed and block).

The hash is fully determined by the token, so its MI is H(expert) under that assignment: the most information about
the token that a routing with these loads can carry (I(T; E) = H(E) - H(E | T) <= H(E)). So ``trained - hash`` is,
up to the load mismatch and the estimation error, ``-H(E | T)`` of the trained routing and can only be <= 0: it says
how far the trained routing is from a pure token-id router, not whether it is "more specialised" than one. It is
reported with the share ``trained / hash`` (1: the routing is a function of the token id) and has no paper side. The
claim with a side is ``trained - untrained``: routing that specialises by token through training gains information
about the token (paper's side: positive). ST-MoE section 7 found encoder experts specialised by token kind and
decoder experts not; this model is a decoder-only LM, so the side follows the issue's reading of section 7 (experts
specialise by token) rather than ST-MoE's decoder finding. The untrained router already carries information about
the token (its input holds the token's embedding), which is why it, and not label shuffling, is the null. Loads
confound the comparison (MI <= H(E), and an untrained router may be less balanced than a trained one): each routing's
H(E) and its MI / H(E) (the share of its expert entropy that the token explains) are printed to separate the two.

Estimation: the plug-in MI from the joint counts is biased upwards (about ``(cells - token ids - experts + 1) / (2 N
ln 2)`` bits: an id seen once looks fully determined). The three routings share the tokens, so the token marginal
and its counts, but not the bias: it grows with the number of occupied (token, expert) cells, and is nil for the hash
(one cell per id: its plug-in MI is the plug-in H(E)). Comparing plug-in values would favour the routing that spreads
an id over more experts, so the verdicts use the Miller-Madow-corrected MI (``stats.miller_madow_mi_bits``, the
first-order bias subtracted); the plug-in values are printed beside them. Miller-Madow under-corrects where many ids
are seen only a few times: on a 40-step trial run, the corrected MI of random subsets still fell from 16 k to 32 k
tokens by 0.05 bits (trained) and 0.10 bits (untrained, whose routing spreads ids over more experts). Hence the
default of 262,144 tokens, most of the held-out split (about 400 k tokens), and per routing the **half-sample drift**:
the corrected MI on a random half of the tokens (the same half for the three routings) minus on all of them, the bias
left at N if it falls as 1/N. A larger drift for the untrained routing biases ``trained - untrained`` downwards,
against the paper's side. Also reported, descriptively: the corrected MI of the expert with the previous token
(positions 1..127 of a window) and with the position in the window.

Runs: ``configs/repro/switch-e8.toml`` (a 4-block decoder, d_model 64, top-1 over 8 experts in blocks 1 and 3, jitter
1e-2, c_B = 1e-2, AdamW 3e-3 with a cosine schedule) with ``moe.capacity_factor = none``: dropless, so every token's
router choice is the expert that processed it in training, and the routing read is not shaped by which tokens
overflowed. ``--steps`` steps of 16 x 128 tokens on ``data.corpus = "mixed"`` (one tokenizer and token split shared
by every run), ``--seeds`` seeds; the validation loss on the whole held-out split at the end is reported with its seed
standard deviation. Differences are paired by seed (the three routings of seed s read the same tokens; the untrained
model is seed s's own initialisation), with 95 % t intervals over seeds; "reproduced" when the interval excludes 0 on
the paper's side, "contradicted" on the other, otherwise "not resolved at this scale".

Steps: 1,500 (3.1 M tokens, under one epoch of the corpus), more than the 600 of the other switch-e8 studies, to give
the routing longer to settle; the study has a single arm, so five such runs still fit in the hour.

Usage (runs in parallel, one thread each; the defaults took 24 minutes on 2 cores: the corpus tokenized once, five
runs of about 8 minutes two at a time, then a minute or two of routing per run, two at a time)::

    python benchmarks/repro/token_specialisation.py --out docs/results/token_specialisation [--runs runs/token-spec]
    python benchmarks/repro/token_specialisation.py --out docs/results/token_specialisation --section docs/RESULTS.md

Finished runs (``summary.json``) are skipped on a rerun; ``results.json``, ``runs.csv`` (one row per seed and MoE
layer), ``results.md`` and ``mi.png`` are written into ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import math
import multiprocessing
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, log, prepare_shared_data, run_all, study_main, study_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "repro" / "switch-e8.toml")
HEADING = "## Token specialisation against null routings (ST-MoE section 7)"
INITIAL = "step_00000000"  # the checkpoint the trainer writes before the first step
ROUTINGS = ("trained", "untrained", "hash")
NULLS = {"untrained": +1, "hash": 0}  # the paper's side of trained - null (0: none, reported only)
MEAN = "mean of layers"
PLOT, PLOT_ALT = "mi.png", "mutual information of token and expert, trained vs null routings"
FIGURES = ("mi_bits", "mi_plugin_bits", "mi_drift_bits", "expert_entropy_bits", "determined_share", "prev_mi_bits",
           "position_mi_bits")


# -- statistics --------------------------------------------------------------------------------------------------
def routing_figures(token_ids_N: np.ndarray, position_N: np.ndarray, expert_N: np.ndarray,
                    half_N: np.ndarray | None = None) -> dict:
    """One routing of a layer: MI(token; expert) (Miller-Madow and plug-in), H(expert) (plug-in), the share
    MI / H(expert) with both corrected (1 for a function of the token), the corrected MI of the expert with the
    previous token (positions > 0; the tokens are whole windows in order) and with the position; and with ``half_N``
    (a mask of half the tokens) ``mi_drift_bits``: the corrected MI on that half minus on all, what is left of the
    estimate's bias at N if it falls as 1/N."""
    from moekit.analysis.stats import entropy_bits, miller_madow_mi_bits, mutual_information_bits

    n = len(expert_N)
    h = entropy_bits(expert_N)
    h_mm = h + (len(np.unique(expert_N)) - 1) / (2 * n * math.log(2))
    mi = miller_madow_mi_bits(token_ids_N, expert_N)
    after = np.nonzero(position_N > 0)[0]
    drift = math.nan if half_N is None else miller_madow_mi_bits(token_ids_N[half_N], expert_N[half_N]) - mi
    return {
        "mi_bits": mi,
        "mi_plugin_bits": mutual_information_bits(token_ids_N, expert_N),
        "mi_drift_bits": drift,
        "expert_entropy_bits": h,
        "determined_share": float(mi / h_mm) if h_mm > 0 else math.nan,
        "prev_mi_bits": miller_madow_mi_bits(token_ids_N[after - 1], expert_N[after]) if len(after) else math.nan,
        "position_mi_bits": miller_madow_mi_bits(position_N, expert_N),
    }


def hash_figures(token_ids_N: np.ndarray, position_N: np.ndarray, trained_N: np.ndarray, num_experts: int,
                 draws: int, rng: np.random.Generator, half_N: np.ndarray | None = None) -> dict:
    """:func:`routing_figures` of ``draws`` load-matched token hashes (their mean), and ``load_deviation``: the
    largest |hash share - trained share| of an expert over the draws."""
    from moekit.analysis.stats import load_matched_hash

    target_E = np.bincount(trained_N, minlength=num_experts) / len(trained_N)
    figures, deviation = [], 0.0
    for _ in range(draws):
        hashed_N = load_matched_hash(token_ids_N, trained_N, num_experts, rng)
        figures.append(routing_figures(token_ids_N, position_N, hashed_N, half_N))
        share_E = np.bincount(hashed_N, minlength=num_experts) / len(hashed_N)
        deviation = max(deviation, float(np.abs(share_E - target_E).max()))
    out = {k: statistics.fmean(f[k] for f in figures) for k in FIGURES}
    out["load_deviation"] = deviation
    return out


def layer_row(token_ids_N: np.ndarray, position_N: np.ndarray, trained_N: np.ndarray, untrained_N: np.ndarray,
              num_experts: int, draws: int, rng: np.random.Generator) -> dict:
    """The figures of one MoE layer of one seed, flat (``trained_mi_bits``, ``untrained_mi_bits``, ``hash_mi_bits``,
    ...): what a row of runs.csv holds besides the seed, the block and the run. The half of the tokens for the
    drift is drawn from ``rng`` first, the same half for the three routings."""
    n = len(token_ids_N)
    half_N = rng.permutation(n) < n // 2
    figs = {"trained": routing_figures(token_ids_N, position_N, trained_N, half_N),
            "untrained": routing_figures(token_ids_N, position_N, untrained_N, half_N),
            "hash": hash_figures(token_ids_N, position_N, trained_N, num_experts, draws, rng, half_N)}
    row: dict = {"tokens": n, "distinct_tokens": len(np.unique(token_ids_N))}
    for routing in ROUTINGS:
        row.update({f"{routing}_{k}": figs[routing][k] for k in FIGURES})
    row["hash_load_deviation"] = figs["hash"]["load_deviation"]
    row["hash_draws"] = draws
    return row


# -- runs --------------------------------------------------------------------------------------------------------
def overrides(seed: int, args: argparse.Namespace) -> list[str]:
    return [*data_overrides(args), "moe.capacity_factor='none'", f"train.seed={seed}",
            f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.eval_batches='none'",
            "train.log_every=10", "train.checkpoint_every=0", "train.threads=1", "train.progress='off'"]


def token_routing(run_path: str, n_tokens: int, draws: int, seed: int) -> list[dict]:
    """Per MoE layer of the run: :func:`layer_row` on its first ``n_tokens`` validation tokens, routed by the final
    checkpoint and by the step-0 checkpoint (both traced with ``moekit.analysis.trace.trace_model``)."""
    import torch

    from moekit.analysis.trace import iter_windows, trace_model
    from moekit.lab.api import load_run
    from moekit.training import checkpoint as ckpt

    torch.set_num_threads(1)
    run = load_run(run_path)
    initial = run.config.task.build_model(run.model.config)
    ckpt.load_checkpoint(ckpt.verify_checkpoint(Path(run_path) / "checkpoints" / INITIAL), initial)
    seq, batch = run.config.data.seq_len, run.config.train.batch_size
    traces = {name: trace_model(model.eval(), iter_windows(run.data.val_tokens, seq, batch, n_tokens))
              for name, model in (("trained", run.model), ("untrained", initial))}
    tr, un = traces["trained"], traces["untrained"]
    rows = []
    for li, block in enumerate(tr.layer_blocks):
        row = layer_row(tr.token_ids_N, tr.position_N, tr.expert_ids_LNK[li][:, 0], un.expert_ids_LNK[li][:, 0],
                        tr.num_experts, draws, np.random.default_rng([seed, block]))
        rows.append({"block": block, "step": run.step, **row})
    return rows


def study(args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    jobs = [(str(runs / f"seed{s}"), BASE, overrides(s, args)) for s in range(args.seeds)]
    data = prepare_shared_data(runs, BASE, jobs[0][2])
    log(f"{len(jobs)} runs, {args.jobs} at a time")
    done = run_all(jobs, data, args.jobs)
    log(f"routing of {args.tokens:,} validation tokens per run, trained and untrained, {args.hash_draws} hashes")
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        read = list(pool.map(token_routing, [r["run_dir"] for r in done], [args.tokens] * len(done),
                             [args.hash_draws] * len(done), range(len(done))))
    rows = []
    for s, (r, layers) in enumerate(zip(done, read, strict=True)):
        for layer in layers:
            rows.append({"seed": s, **layer, "final_val_loss": r["summary"]["final_val_loss"],
                         "unigram_val_loss": r["summary"].get("unigram_val_loss"), "run_dir": r["run_dir"]})
    return {"config": {k: v for k, v in vars(args).items() if k != "section"}, "rows": rows}


# -- analysis ----------------------------------------------------------------------------------------------------
def scope_name(block: int) -> str:
    return f"block {block}"


def analyse(result: dict) -> dict:
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    blocks = sorted({r["block"] for r in rows})
    by = {(r["seed"], r["block"]): r for r in rows}
    scopes = {scope_name(b): [b] for b in blocks} | {MEAN: blocks}

    def per_seed(key: str, scope: str) -> list[float]:
        """``key`` per seed: the layer's value, or for the mean scope the mean over the MoE layers."""
        return [statistics.fmean(by[s, b][key] for b in scopes[scope]) for s in seeds]

    figures = {scope: {routing: {k: interval(per_seed(f"{routing}_{k}", scope)) for k in FIGURES}
                       for routing in ROUTINGS} for scope in scopes}
    claims = []
    for scope in scopes:
        trained, trained_plugin = per_seed("trained_mi_bits", scope), per_seed("trained_mi_plugin_bits", scope)
        for null, side in NULLS.items():
            d = [a - b for a, b in zip(trained, per_seed(f"{null}_mi_bits", scope), strict=True)]
            dp = [a - b for a, b in zip(trained_plugin, per_seed(f"{null}_mi_plugin_bits", scope), strict=True)]
            m, h = interval(d)
            claims.append({"scope": scope, "null": null, "mean": m, "half": h, "per_seed": d,
                           "plugin": interval(dp), "plugin_per_seed": dp,
                           "verdict": verdict(m, h, side) if side else "-"})
    share = {scope: interval([a / b if b > 0 else math.nan for a, b in zip(
        per_seed("trained_mi_bits", scope), per_seed("hash_mi_bits", scope), strict=True)]) for scope in scopes}
    loss = [by[s, blocks[0]]["final_val_loss"] for s in seeds]

    def sd(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else math.nan

    return {"seeds": seeds, "blocks": blocks, "scopes": list(scopes), "figures": figures, "claims": claims,
            "share_of_hash": share, "val_loss": interval(loss),
            "seed_sd": {"final_val_loss": sd(loss), "trained_mi_bits": sd(per_seed("trained_mi_bits", MEAN))},
            "hash_load_deviation": max(r["hash_load_deviation"] for r in rows),
            "tokens": rows[0]["tokens"], "distinct_tokens": rows[0]["distinct_tokens"]}


# -- report ------------------------------------------------------------------------------------------------------
def _pm(pair: tuple[float, float] | list[float], digits: int = 4, sign: bool = False) -> str:
    m, h = pair
    return f"{m:{'+' if sign else ''}.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")


def render(result: dict, stats: dict) -> str:
    cfg = result["config"]
    n = len(stats["seeds"])
    rows = result["rows"]
    lines = [
        HEADING, "", "```sh", "python benchmarks/repro/token_specialisation.py " + cfg["command"], "```", "",
        f"{n} seeds of configs/repro/switch-e8.toml (top-1 over 8 experts in blocks "
        f"{', '.join(map(str, stats['blocks']))}, dropless), {cfg['steps']} steps of 16 x 128 tokens on data.corpus "
        f"= \"{cfg['corpus']}\"; validation loss on the whole held-out split at the end {_pm(stats['val_loss'])} "
        f"nats/token (seed sd {stats['seed_sd']['final_val_loss']:.4f}; unigram {rows[0]['unigram_val_loss']:.4f}). "
        f"Routing read on the first {stats['tokens']:,} validation tokens ({stats['distinct_tokens']:,} distinct ids) "
        "by three routings per seed: the final checkpoint (trained), the same run at step 0 (untrained), and a random "
        f"token-id hash with the trained layer's loads (mean of {cfg['hash_draws']} draws; largest load deviation "
        f"{stats['hash_load_deviation']:.4f}). MI(token; expert) in bits, Miller-Madow corrected (plug-in beside "
        "it; half-sample drift: the corrected MI on a random half of the tokens minus on all of them, the bias left "
        "if it falls as 1/N); MI / H(expert): the share of the routing's expert entropy the token id explains (1 "
        "for any function of the token, so for the hash). Mean and 95 % interval over seeds; the seed sd of the "
        f"trained MI (mean of the layers) is {stats['seed_sd']['trained_mi_bits']:.4f} bits.",
        "",
        "| layer | routing | H(expert) | MI(token; expert) | plug-in | half-sample drift | MI / H(expert) | "
        "MI(previous token; expert) | MI(position; expert) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scope in stats["scopes"]:
        for routing in ROUTINGS:
            f = stats["figures"][scope][routing]
            lines.append(f"| {scope} | {routing} | {_pm(f['expert_entropy_bits'], 3)} | {_pm(f['mi_bits'])} | "
                         f"{_pm(f['mi_plugin_bits'])} | {_pm(f['mi_drift_bits'], sign=True)} | "
                         f"{_pm(f['determined_share'], 3)} | {_pm(f['prev_mi_bits'])} | {_pm(f['position_mi_bits'])} |")
    lines += ["", "Paired differences of MI(token; expert), trained minus null, same seed (bits; the verdict on the "
              "corrected values). Trained minus hash is at most 0 up to the load mismatch (the hash, a function of "
              "the token, carries all of H(expert)), so it has no paper side: it measures how far the trained "
              "routing is from a pure token-id router.", "",
              "| difference | layer | mean ± 95 % | plug-in | paper's side | verdict |", "|---|---|---|---|---|---|"]
    for c in stats["claims"]:
        side = "positive (training specialises routing by token)" if NULLS[c["null"]] > 0 else "none"
        lines.append(f"| trained - {c['null']} | {c['scope']} | {_pm((c['mean'], c['half']), sign=True)} | "
                     f"{_pm(c['plugin'], sign=True)} | {side} | {c['verdict']} |")
    lines += ["", "Trained MI as a share of the load-matched hash's (1: the trained routing is a function of the token "
              "id): " + "; ".join(f"{scope} {_pm(stats['share_of_hash'][scope], 3)}" for scope in stats["scopes"])
              + ".", "", f"![{PLOT_ALT}]({PLOT})"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    write_outputs(out, result, stats, render(result, stats), result["rows"])
    plot(stats, out / PLOT)


def plot(stats: dict, path: Path) -> None:
    """Left: MI(token; expert) of the three routings per layer (mean, 95 % interval over seeds), each routing's
    H(expert) dotted; right: what the claims are about, trained minus each null paired by seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"trained": "tab:blue", "untrained": "tab:grey", "hash": "tab:orange"}
    scopes = stats["scopes"]
    xs = np.arange(len(scopes))

    def bars(ax, values: list, offset: float, colour: str, label: str, marker: str = "o") -> None:
        ax.errorbar(xs + offset, [m for m, _ in values], yerr=[0.0 if math.isnan(h) else h for _, h in values],
                    color=colour, marker=marker, ls="none", capsize=3, label=label)

    for i, routing in enumerate(ROUTINGS):
        off = (i - 1) * 0.2
        bars(left, [stats["figures"][s][routing]["mi_bits"] for s in scopes], off, colours[routing], routing)
        left.scatter(xs + off, [stats["figures"][s][routing]["expert_entropy_bits"][0] for s in scopes],
                     marker="_", s=200, color=colours[routing])
    left.scatter([], [], marker="_", s=200, color="black", label="H(expert) of the routing (its ceiling)")
    left.axhline(3.0, color="black", ls=":", lw=1, label="log2 8: uniform over 8 experts")
    left.set_xticks(xs, scopes)
    left.set_ylabel("MI(token id; expert), bits (Miller-Madow)")
    left.set_title("mean and 95 % interval over seeds")
    left.legend(fontsize=8)
    for i, null in enumerate(NULLS):
        cs = [c for c in stats["claims"] if c["null"] == null]
        bars(right, [(c["mean"], c["half"]) for c in cs], (i - 0.5) * 0.2, colours[null], f"trained - {null}")
    right.axhline(0.0, color="black", lw=1)
    right.set_xticks(xs, scopes)
    right.set_ylabel("MI difference, bits (paired by seed, 95 % interval)")
    right.set_title("trained - untrained above 0: the paper's side\ntrained - hash: at most 0 by construction")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section_text(out: Path, results_md: Path) -> str:
    """``out``'s results.md with its plot linked from where ``results_md`` lies."""
    rel = os.path.relpath((out / PLOT).resolve(), results_md.resolve().parent)
    return (out / "results.md").read_text().replace(f"]({PLOT})", f"]({Path(rel).as_posix()})")


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "runs/token-specialisation", seeds=5, steps=1500)
    p.add_argument("--tokens", type=int, default=262144, help="validation tokens whose routing is read")
    p.add_argument("--hash-draws", type=int, default=20, help="load-matched token hashes per layer and seed")
    return study_main(p, argv, HEADING, study, lambda result, args: write(result, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
