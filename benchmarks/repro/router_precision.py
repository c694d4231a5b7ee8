"""Router precision (Switch Transformer Table 2): does a bfloat16 router lose quality or stability against a float32
router once router logits are large, and how many top-1 choices does bfloat16 change on the same weights?

Every run is ``configs/repro/switch-e8.toml`` (a 4-block decoder, d_model 64, top-1 over 8 experts in blocks 1 and 3,
capacity factor 1.25, jitter 1e-2, no z-loss, AdamW with a cosine schedule, global clipping at 1.0) on
``data.corpus = "mixed"`` (one tokenizer and one token split shared by every run), ``--steps`` steps of 16 x 128
tokens. Only the router's precision differs between the arms (``moe.router_dtype``: the router input, its logits,
softmax and gates in that dtype); the rest of the model stays float32, so that the router is the only change (Switch
compares a bfloat16 model with and without a float32 router; a bfloat16 CPU model would also be several times
slower).

1. **Sweep.** The float32 arm at each learning rate of ``--lrs``, ``--sweep-seeds`` seeds. No z-loss and a high
   learning rate make router logits grow; the study's rate is the highest at which no float32 run is unstable (its
   training loss, averaged over a trailing window of ``--smooth`` logged steps, more than ``--spike`` nats above
   the running minimum of that average, or non-finite), the condition the issue asks for: large logits, float32
   stable. The average is there because single batches of the mixed corpus differ by that much: in a first sweep
   read step by step, float32 runs at lr 3e-3 and 1e-2, whose curves were smooth, had single steps 0.43 to 0.51
   nats above the running minimum late in training, and every learning rate counted as unstable. A divergence
   lasts for many steps; batch noise does not.
2. **Arms.** At that rate, ``fp32`` and ``bf16`` routers, ``--seeds`` seeds each, paired (seed s of both arms shares
   its initialisation and batches; the router's jitter draws differ in dtype only).
3. **Read.** Validation loss on the whole held-out split at the end, ``bf16 - fp32`` paired by seed with a 95 % t
   interval (the paper's side: positive, bfloat16 worse); unstable runs per arm with Fisher's exact test (the
   paper's side: more with bfloat16); the largest router logit of each run; and on every final checkpoint the share
   of top-1 choices that differ when the same router, on the same inputs (the first ``--flip-tokens`` validation
   tokens, each layer's input from a float32-router forward pass), computes in bfloat16 instead of float32.

A direction is "reproduced" when the interval (or Fisher's p < 0.05) is on the paper's side, "contradicted" when on
the other, otherwise "not resolved at this scale".

Usage (runs in parallel, one thread each)::

    python benchmarks/repro/router_precision.py --out docs/results/router_precision [--runs runs/router-precision]
    python benchmarks/repro/router_precision.py --out docs/results/router_precision --section docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import count_verdict, interval, plot_runs, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, log, prepare_shared_data, run_all, study_main, study_parser  # noqa: E402
from zloss_stability import fisher_two_sided, spikes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "repro" / "switch-e8.toml")
ARMS = {"fp32": "float32", "bf16": "bfloat16"}
HEADING = "## Router precision: a bfloat16 router against a float32 router (Switch Table 2)"
COMMON = ["model.z_loss_coef=0.0", "train.nonfinite='skip'", "train.max_consecutive_skips=100000",
          "train.log_every=1", "train.checkpoint_every=0", "train.threads=1", "train.progress='off'",
          "train.eval_batches='none'"]


def overrides(arm: str, lr: float, seed: int, args: argparse.Namespace) -> list[str]:
    return [*COMMON, *data_overrides(args), f"moe.router_dtype='{ARMS[arm]}'", f"train.lr={lr}",
            f"train.seed={seed}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"]


def run_dir(args: argparse.Namespace, arm: str, lr: float, seed: int) -> str:
    return str(Path(args.runs) / f"{arm}-lr{lr:g}-seed{seed}")


def trailing_mean(losses: list[float], window: int) -> list[float]:
    """The mean of each step's loss and the ``window - 1`` before it (fewer at the start); a non-finite loss makes
    the means of the windows that hold it non-finite."""
    out, total, finite = [], 0.0, []
    for i, x in enumerate(losses):
        finite.append(math.isfinite(x))
        total += x if math.isfinite(x) else 0.0
        if i >= window:
            total -= losses[i - window] if finite[i - window] else 0.0
        start = max(0, i - window + 1)
        out.append(total / (i - start + 1) if all(finite[start:i + 1]) else math.nan)
    return out


def unstable_steps(losses: list[float], args: argparse.Namespace) -> int:
    """Steps at which the run counts as unstable: the trailing mean over ``--smooth`` steps more than ``--spike``
    nats above its running minimum, or not finite."""
    return spikes(trailing_mean(losses, args.smooth), args.spike)


def figures(run: dict) -> dict:
    records = run["records"]
    return {"run_dir": run["run_dir"], "losses": [r["ce_loss"] for r in records],
            "max_router_logit": max((r.get("max_router_logit", 0.0) for r in records), default=0.0),
            "final_val_loss": run["summary"].get("final_val_loss"),
            "unigram_val_loss": run["summary"].get("unigram_val_loss"),
            "skipped_steps": run["summary"].get("skipped_steps", 0)}


def flip_shares(run_path: str, n_tokens: int) -> list[float]:
    """Per MoE layer of the run's final checkpoint: the share of the first ``n_tokens`` validation tokens whose
    top-1 expert differs between the router in float32 and in bfloat16, on the same router inputs (captured from a
    float32-router forward pass, so both precisions see identical inputs in every layer)."""
    import torch

    from moekit.lab.api import load_run
    from moekit.routing.topk import TopKRouter

    torch.set_num_threads(1)
    run = load_run(run_path)
    model = run.model.eval()
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    seq = run.config.data.seq_len
    n_seq = max(1, n_tokens // seq)
    ids_BT = torch.as_tensor(run.data.val_tokens[: n_seq * seq].astype("int64")).reshape(n_seq, seq)
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, r in enumerate(routers):
        r.router_dtype = "float32"
        handles.append(r.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        model(ids_BT)
        for h in handles:
            h.remove()
        shares = []
        for i, r in enumerate(routers):
            top1 = {}
            for name in ("float32", "bfloat16"):
                r.router_dtype = name
                top1[name] = r(inputs[i]).expert_ids_SK[:, 0]
            shares.append(float((top1["float32"] != top1["bfloat16"]).double().mean()))
    return shares


def study(args: argparse.Namespace) -> dict:
    lrs = sorted(args.lrs)
    src = prepare_shared_data(Path(args.runs), BASE, overrides("fp32", lrs[0], 0, args))

    keys = [(lr, s) for lr in lrs for s in range(args.sweep_seeds)]
    log(f"sweep: fp32 at lr {lrs}, seeds {list(range(args.sweep_seeds))}")
    done = run_all([(run_dir(args, "fp32", lr, s), BASE, overrides("fp32", lr, s, args)) for lr, s in keys],
                   src, args.jobs)
    sweep = {k: figures(r) for k, r in zip(keys, done, strict=True)}
    unstable_at = {lr: sum(unstable_steps(sweep[lr, s]["losses"], args) > 0 for s in range(args.sweep_seeds))
                   for lr in lrs}
    max_logit_at = {lr: max(sweep[lr, s]["max_router_logit"] for s in range(args.sweep_seeds)) for lr in lrs}
    stable = [lr for lr in lrs if unstable_at[lr] == 0]
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "section"},
                    "sweep": {str(lr): {"unstable": unstable_at[lr], "max_router_logit": max_logit_at[lr]}
                              for lr in lrs}}
    if not stable:
        log("every learning rate of the sweep had an unstable float32 run: no study rate")
        return result
    lr = max(stable)
    result["lr"] = lr
    log(f"study lr {lr} (largest float32 router logit in the sweep there: {max_logit_at[lr]:.2f})")

    keys = [(arm, s) for s in range(args.seeds) for arm in ARMS]
    done = run_all([(run_dir(args, arm, lr, s), BASE, overrides(arm, lr, s, args)) for arm, s in keys],
                   src, args.jobs)
    rows = []
    for (arm, s), r in zip(keys, done, strict=True):
        f = figures(r)
        rows.append({"arm": arm, "seed": s, "lr": lr, "final_val_loss": f["final_val_loss"],
                     "unigram_val_loss": f["unigram_val_loss"], "max_router_logit": f["max_router_logit"],
                     "spikes": unstable_steps(f["losses"], args), "skipped_steps": f["skipped_steps"],
                     "flip_share_per_layer": flip_shares(f["run_dir"], args.flip_tokens), "run_dir": f["run_dir"]})
        result.setdefault("losses", {})[f"{arm}/{s}"] = f["losses"]
    result["rows"] = rows
    return result


def analyse(result: dict) -> dict:
    if "rows" not in result:
        return {}
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["arm"], r["seed"]): r for r in rows}
    n = len(seeds)
    out: dict = {"seeds": seeds, "lr": result["lr"]}
    out["loss"] = {a: interval([by[a, s]["final_val_loss"] for s in seeds]) for a in ARMS}
    out["seed_sd"] = {a: statistics.stdev([by[a, s]["final_val_loss"] for s in seeds]) if n > 1 else math.nan
                      for a in ARMS}
    out["max_logit"] = {a: interval([by[a, s]["max_router_logit"] for s in seeds]) for a in ARMS}
    out["flip"] = {a: interval([statistics.fmean(by[a, s]["flip_share_per_layer"]) for s in seeds]) for a in ARMS}
    out["unstable"] = {a: sum(by[a, s]["spikes"] > 0 for s in seeds) for a in ARMS}
    d = [by["bf16", s]["final_val_loss"] - by["fp32", s]["final_val_loss"] for s in seeds]
    m, h = interval(d)
    out["diff"] = {"mean": m, "half": h, "per_seed": d, "verdict": verdict(m, h, +1)}
    p = fisher_two_sided(out["unstable"]["bf16"], n, out["unstable"]["fp32"], n)
    out["fisher"] = {"p": p, "verdict": count_verdict(p, out["unstable"]["bf16"] - out["unstable"]["fp32"], +1)}
    return out


def render(result: dict, stats: dict) -> str:
    cfg = result["config"]
    lines = [HEADING, "", "```sh", "python benchmarks/repro/router_precision.py " + cfg["command"], "```", ""]
    sweep = ", ".join(f"lr {lr}: {v['unstable']}/{cfg['sweep_seeds']} unstable, largest logit "
                      f"{v['max_router_logit']:.2f}" for lr, v in result["sweep"].items())
    lines.append(f"Sweep of the float32 router ({cfg['steps']} steps of 16 x 128 tokens, data.corpus = "
                 f"\"{cfg['corpus']}\"; unstable: the training loss, averaged over a trailing window of "
                 f"{cfg['smooth']} steps, more than {cfg['spike']} nats above its running minimum): {sweep}.")
    if not stats:
        lines += ["", "No learning rate of the sweep kept every float32 run stable, so the study did not run."]
        return wrap_markdown(lines) + "\n"
    n = len(stats["seeds"])
    lines += ["", f"At lr {stats['lr']} ({n} seeds per arm, paired; the rest of the model float32): validation loss "
              "on the whole held-out split at the end (nats/token), the largest router logit of each run, and the "
              f"share of top-1 choices that bfloat16 changes on the same weights and inputs (first "
              f"{cfg['flip_tokens']:,} validation tokens, mean over the MoE layers).", "",
              "| router | validation loss | seed sd | unstable runs | largest router logit | top-1 flips bf16 vs fp32 "
              "|",
              "|---|---|---|---|---|---|"]
    for a in ARMS:
        (m, h), (lm, lh), (fm, fh) = stats["loss"][a], stats["max_logit"][a], stats["flip"][a]
        lines.append(f"| {a} | {m:.4f} ± {h:.4f} | {stats['seed_sd'][a]:.4f} | {stats['unstable'][a]}/{n} | "
                     f"{lm:.2f} ± {lh:.2f} | {100 * fm:.3f} % ± {100 * fh:.3f} |")
    d, f = stats["diff"], stats["fisher"]
    lines += ["", "| claim | measured | paper's side | verdict |", "|---|---|---|---|",
              f"| validation loss bf16 - fp32 (paired) | {d['mean']:+.4f} ± {d['half']:.4f} | positive (bf16 worse) "
              f"| {d['verdict']} |",
              f"| unstable runs bf16 vs fp32 (Fisher) | {stats['unstable']['bf16']}/{n} vs "
              f"{stats['unstable']['fp32']}/{n}, p = {f['p']:.3g} | more with bf16 | {f['verdict']} |"]
    lines += ["", "![training loss of every run, and bf16 minus fp32 paired by seed](loss.png)"]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    write_outputs(out, result, stats, render(result, stats), result.get("rows"))
    if "rows" in result:
        plot(result, stats, out / "loss.png")


def plot(result: dict, stats: dict, path: Path) -> None:
    """Left: training loss of every run (log scale, so a divergence shows whole); right: the claim, bf16 - fp32
    validation loss per seed with the paired interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"fp32": "tab:blue", "bf16": "tab:red"}
    curves = {key: list(enumerate(losses, start=1)) for key, losses in result["losses"].items()}
    plot_runs(left, curves, colours, {a: f"{a} router" for a in colours}, result["rows"][0].get("unigram_val_loss"))
    left.set_title(f"lr {stats['lr']}")
    d = stats["diff"]
    right.scatter(stats["seeds"], d["per_seed"], color="tab:purple", label="bf16 - fp32, one seed")
    right.axhline(d["mean"], color="tab:purple", lw=1.5, label="mean")
    if math.isfinite(d["half"]):
        right.axhspan(d["mean"] - d["half"], d["mean"] + d["half"], color="tab:purple", alpha=0.2,
                      label="95 % interval")
    right.axhline(0.0, color="black", lw=1)
    right.set_xlabel("seed")
    right.set_ylabel("validation loss difference (nats / token)")
    right.set_title("above 0: the bfloat16 router is worse (Switch's side)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "runs/router-precision", seeds=5, steps=600)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--sweep-seeds", type=int, default=2)
    p.add_argument("--spike", type=float, default=0.5, help="nats above the running minimum that make a run unstable")
    p.add_argument("--smooth", type=int, default=10, help="logged steps in the trailing mean the spike test reads")
    p.add_argument("--flip-tokens", type=int, default=8192, help="validation tokens for the top-1 flip share")
    return study_main(p, argv, HEADING, study, lambda result, args: write(result, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
