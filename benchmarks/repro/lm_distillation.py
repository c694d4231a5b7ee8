"""Distilling a sparse LM into a dense one (Switch Transformer section 4.2): does a dense student trained on a
stronger sparse teacher's soft targets end better than the same dense model trained as long on the labels alone, and
what share of the teacher's lead does it keep?

Switch section 4.2 / Table 6 distils a sparse teacher into its FLOP-matched dense model with the loss
``0.75 * CE(labels) + 0.25 * CE(teacher's probabilities)`` and keeps about 30 % of the sparse model's quality gain
over the dense baseline (ALGORITHMS.md section 13). The directions checked here, paired by seed:

1. the gate: the teacher's final validation loss minus the dense model D's (the teacher must be clearly better,
   the interval below 0; when it is not, nothing is claimed about distillation);
2. the student's loss minus the control's (paper's side: negative, the distilled dense model better);
3. the share of the teacher's lead kept, ``(L_control - L_student) / (L_control - L_teacher)`` per seed, its mean and
   95 % t interval (paper's side: above 0; Switch about 0.3, compared descriptively).

Arms, per seed s (``train.seed = s`` everywhere: seed s of every arm walks the same order of training windows):

- **dense D**: ``configs/repro/switch-dense.toml`` (a 4-block decoder, d_model 64, every FFN 256 wide; AdamW 3e-3,
  50 warm-up steps, cosine), ``--steps`` steps: batches 0 .. N-1 of seed s's order;
- **teacher T**: ``configs/repro/switch-e{--experts}.toml`` (the same with a top-1 MoE of E experts of d_ff 256 in
  blocks 1 and 3, jitter 1e-2, c_B = 1e-2), dropless (``moe.capacity_factor = none``: every token gets its expert
  in training and in the soft targets), ``--teacher-steps`` steps (default twice ``--steps``): batches 0 .. N_T-1.
  More experts and longer, so that its lead over D is large and resolved (the earlier write-ups had teachers with
  little or no lead: 400 steps in the decoder study of "Routing analysis and distillation", none at all in the
  encoder-decoder one);
- **student**: ``moekit distill`` (``moekit.lab.distill.run.distill_run``) of T with ``--init scratch`` (nothing
  copied from T: the student starts at its own initialisation from ``train.seed = s``, which is D's initial weights,
  checked per seed against D's step-0 checkpoint), hard weight 0.75 (Switch's mix), ``--student-steps`` steps
  (default ``--steps``) with D's schedule, on **fresh batches**: ``--data-offset N_T``, batches N_T .. N_T+M-1 of
  the same order, the windows right after the teacher's last batch, none of which T (or D) trained on as long as
  ``N_T + M`` batches fit in one epoch (checked per seed from ``distill.json``: ``teacher_batches_replayed`` and
  ``batches_per_epoch``);
- **control**: the same call with hard weight 1.0 (the teacher term off: plain training): the same initial weights,
  the same fresh batches, the same schedule and steps, labels only. Student minus control is what the teacher's
  soft targets did, with no "more steps" confound (the earlier decoder write-up compared a student that had had its
  teacher's 400 steps plus 400 of its own with a dense model trained 400: "gain kept" of 470-500 %).

Why the student starts from scratch and not from the teacher's non-expert weights, as Switch's does: T has trained
N_T steps, so a student initialised from it has had more training than any control of equal steps, and the share
kept would mix what the teacher's weights carry with what its soft targets teach; here the student and the control
share D's initial weights, so the share kept is the soft targets' alone. Switch's ~30 % was measured with the
student initialised from the teacher, so a smaller share here would not contradict it; a teacher-initialised student
with a fair control is not run (its control would need N_T + M dense steps).

Also reported without a paper side: the teacher minus the control (the lead to keep, the denominator; T's lead
comes from more experts *and* twice the steps, so it is larger than Switch's sparse-vs-dense gap at equal steps),
and D minus the control (two dense models from the same weights, the teacher's first batches against the fresh
ones: the fresh batches should be neither easier nor harder). Compute: the student and the control take the same
steps of the same dense model (the same FLOPs per token); the student also runs the teacher's forward pass each step
(about 0.6x a dense training step's CPU time here), which a FLOP-matched comparison of the *student model* leaves
out, as Switch does.

Every run on ``data.corpus = "mixed"`` (docs/DATA.md 3.3; the tokenizer and token split prepared once into
``--runs``/data and copied into every run), 16 x 128 tokens a step; validation loss on the whole held-out split at the
end of every run, in eval mode (the teacher's is measured again inside each distillation run: runs.csv's
``teacher_in_distill``), 95 % t intervals over seeds, verdicts by ``_report.verdict``; the seed standard deviation of
each arm is printed.

Budget. CPU time per training step (forward, backward, clipping and AdamW on one 16 x 128 batch, one thread, 20 and 40
steps after 3 warm-up steps, random tokens of a 2,048 vocabulary, measured at ``nice -n 5`` while another study's two
training processes held the 2 cores): dense 0.22-0.24 s, e32 dropless 0.26-0.30 s (e16 0.25 s), a student with the e32
teacher's forward 0.37-0.38 s (with e16 0.32 s); the control is a dense step. One validation batch (forward only)
costs 0.11-0.12 s, so a whole-split evaluation of the mixed corpus (420 k validation tokens, 206 batches) about 24 s;
each distillation run makes three (teacher, student before and after training), each other run one. With the defaults
(5 seeds, N = M = 700, N_T = 1,400, E = 32) a seed costs about 700 x 0.23 + 1,400 x 0.28 + 700 x 0.37 + 700 x 0.23 =
970 s of training and about 210 s of evaluation, unigram baselines, plots and start-up: 5 x 1,180 s = 5,900 CPU s,
about 50 minutes 2 at a time, plus about 3.5 minutes to prepare the data (one process): about 53 minutes on 2 free
cores. N_T + M = 2,100 of the corpus' 3,859 batches per epoch (7.9 M training tokens): the student's batches are
fresh. A tiny trial (``--max-chars 600000 --steps 20 --teacher-steps 30 --seeds 2``) takes about 3 minutes.

Usage (runs in parallel, one thread each)::

    python benchmarks/repro/lm_distillation.py --out docs/results/lm_distillation [--runs runs/lm-distillation]
    python benchmarks/repro/lm_distillation.py --out docs/results/lm_distillation --section docs/RESULTS.md

Finished runs (``summary.json``) are skipped on a rerun; ``results.json``, ``runs.csv``, ``results.md`` and
``distillation.png`` are written into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import data_overrides, distill_all, log, prepare_shared_data, run_all, study_main, study_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "repro"
DENSE = CONFIGS / "switch-dense.toml"
ARMS = ("dense", "teacher", "control", "student")
HEADING = "## Distilling a sparse LM into a dense one (Switch section 4.2)"
PLOT, PLOT_ALT = "distillation.png", "validation loss of the four arms and the share of the teacher's lead kept"
SWITCH_KEPT = 0.3  # Switch section 4.2: about 30 % of the sparse teacher's gain kept
NOT_CLAIMED = "not claimed (the teacher's lead over D is not resolved)"


def teacher_config(experts: int) -> Path:
    return CONFIGS / f"switch-e{experts}.toml"


# -- runs --------------------------------------------------------------------------------------------------------
def train_overrides(seed: int, steps: int, args: argparse.Namespace, moe: bool) -> list[str]:
    return [*data_overrides(args), *(["moe.capacity_factor='none'"] if moe else []), f"train.seed={seed}",
            f"train.max_steps={steps}", f"train.eval_every={steps}", "train.eval_batches='none'",
            "train.checkpoint_every=0", "train.threads=1", "train.progress='off'"]


def distill_overrides(steps: int) -> list[str]:
    """The student's and the control's ``--set`` values: their own steps (the teacher's seed, schedule, learning rate
    and batch are inherited), evaluated once at the end on the whole held-out split."""
    return [f"train.max_steps={steps}", f"train.eval_every={steps}", "train.eval_batches='none'",
            "train.checkpoint_every=0", "train.threads=1", "train.progress='off'"]


def same_start(a: str | Path, b: str | Path) -> bool | None:
    """Whether two runs' step-0 checkpoints hold the same model weights (None when one is missing)."""
    from safetensors.torch import load_file

    files = [Path(d) / "checkpoints" / "step_00000000" / "model.safetensors" for d in (a, b)]
    if not all(f.is_file() for f in files):
        return None
    x, y = (load_file(str(f)) for f in files)
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def study(args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    n, n_t, m = args.steps, args.teacher_steps, args.student_steps
    seeds = list(range(args.seeds))
    data = prepare_shared_data(runs, str(DENSE), train_overrides(0, n, args, moe=False))

    phase1 = [(str(runs / f"teacher-seed{s}"), str(teacher_config(args.experts)), train_overrides(s, n_t, args, True))
              for s in seeds]
    phase1 += [(str(runs / f"dense-seed{s}"), str(DENSE), train_overrides(s, n, args, False)) for s in seeds]
    log(f"{len(phase1)} runs: teachers (e{args.experts}, {n_t} steps) and dense models ({n} steps), "
        f"{args.jobs} at a time")
    done = run_all(phase1, data, args.jobs)
    teachers, denses = done[: len(seeds)], done[len(seeds):]

    log(f"{2 * len(seeds)} distillation runs ({m} steps from batch {n_t} of each seed's order), {args.jobs} at a time")
    jobs = [(str(runs / f"{arm}-seed{s}"), teachers[s]["run_dir"],
             {"init": "scratch", "hard_weight": hard, "data_offset": n_t, "overrides": distill_overrides(m)})
            for s in seeds for arm, hard in (("student", args.hard_weight), ("control", 1.0))]
    distilled = distill_all(jobs, args.jobs)

    rows = []
    for s in seeds:
        t, d = teachers[s]["summary"], denses[s]["summary"]
        st, co = distilled[2 * s], distilled[2 * s + 1]
        si, ci = st["info"], co["info"]
        fresh = (si["teacher_batches_replayed"] == 0 and si["data_offset_batches"] + m <= si["batches_per_epoch"])
        rows.append({
            "seed": s,
            "dense": d["final_val_loss"],
            "teacher": t["final_val_loss"],
            "control": ci["student_val_loss"],
            "student": si["student_val_loss"],
            "start": si["student_init_val_loss"],
            "teacher_in_distill": si["teacher_val_loss"],
            "start_is_dense_init": bool(same_start(st["run_dir"], denses[s]["run_dir"])
                                        and same_start(co["run_dir"], denses[s]["run_dir"])),
            "fresh_batches": fresh,
            "teacher_batches_replayed": si["teacher_batches_replayed"],
            "data_offset_batches": si["data_offset_batches"],
            "batches_per_epoch": si["batches_per_epoch"],
            "unigram_val_loss": d.get("unigram_val_loss"),
            "dense_parameters": d.get("parameters_total"),
            "teacher_parameters": t.get("parameters_total"),
            "dense_train_flops_per_token": d.get("train_flops_per_token"),
            "teacher_train_flops_per_token": t.get("train_flops_per_token"),
            "dense_train_s": d.get("train_time_s"),
            "teacher_train_s": t.get("train_time_s"),
            "control_train_s": ci["train_seconds"],
            "student_train_s": si["train_seconds"],
            "dense_run": denses[s]["run_dir"],
            "teacher_run": teachers[s]["run_dir"],
            "control_run": co["run_dir"],
            "student_run": st["run_dir"],
        })
    config = {k: v for k, v in vars(args).items() if k != "section"}
    return {"config": config, "rows": rows}


# -- analysis ----------------------------------------------------------------------------------------------------
def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def paired(rows: list[dict], a: str, b: str) -> dict:
    d = [r[a] - r[b] for r in rows]
    m, h = interval(d)
    return {"a": a, "b": b, "per_seed": d, "mean": m, "half": h}


def gain_kept(control: float, teacher: float, student: float) -> float | None:
    """``(L_control - L_student) / (L_control - L_teacher)``; None when the teacher is no better than the control."""
    lead = control - teacher
    return None if lead <= 0 else (control - student) / lead


def against_switch(mean: float, half: float) -> str:
    """Where Switch's ~30 % lies against the share's interval (descriptive: another setup, see the docstring)."""
    if math.isnan(half):
        return "no interval"
    if mean - half <= SWITCH_KEPT <= mean + half:
        return "Switch's ~30 % lies inside the interval"
    return "below Switch's ~30 %" if mean + half < SWITCH_KEPT else "above Switch's ~30 %"


def analyse(result: dict) -> dict:
    rows = sorted(result["rows"], key=lambda r: r["seed"])
    seeds = [r["seed"] for r in rows]
    arms = {}
    for arm in ARMS:
        values = [r[arm] for r in rows]
        m, h = interval(values)
        arms[arm] = {"per_seed": values, "mean": m, "half": h, "sd": _sd(values)}
    gate = paired(rows, "teacher", "dense")
    gate["verdict"] = verdict(gate["mean"], gate["half"], -1)
    resolved = gate["verdict"] == "reproduced"
    claim = paired(rows, "student", "control")
    claim["paper"] = "negative (the distilled student better than the same model trained on the labels)"
    claim["verdict"] = verdict(claim["mean"], claim["half"], -1) if resolved else NOT_CLAIMED
    reported = [paired(rows, "teacher", "control"), paired(rows, "dense", "control")]

    kept = [gain_kept(r["control"], r["teacher"], r["student"]) for r in rows]
    share: dict = {"per_seed": kept, "switch": SWITCH_KEPT}
    missing = [s for s, k in zip(seeds, kept, strict=True) if k is None]
    if missing:
        share.update(mean=math.nan, half=math.nan, against_switch="no interval",
                     verdict=f"undefined (the teacher is no better than the control on seed "
                             f"{', '.join(map(str, missing))})")
    else:
        m, h = interval(kept)
        share.update(mean=m, half=h, against_switch=against_switch(m, h),
                     verdict=verdict(m, h, +1) if resolved else NOT_CLAIMED)
    return {
        "seeds": seeds,
        "arms": arms,
        "gate": gate,
        "gate_resolved": resolved,
        "claim": claim,
        "reported": reported,
        "gain_kept": share,
        "start": interval([r["start"] for r in rows]),
        "all_start_at_dense_init": all(r["start_is_dense_init"] for r in rows),
        "all_fresh": all(r["fresh_batches"] for r in rows),
    }


# -- report ------------------------------------------------------------------------------------------------------
def _pm(m: float, h: float, digits: int = 4, sign: bool = False) -> str:
    text = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return text + ("" if math.isnan(h) else f" ± {h:.{digits}f}")


def _count(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def arm_label(arm: str, cfg: dict) -> str:
    return {
        "dense": f"dense D (switch-dense, {cfg['steps']} steps, the teacher's first batches)",
        "teacher": f"teacher T (top-1, {cfg['experts']} experts, dropless, {cfg['teacher_steps']} steps)",
        "control": f"control: D's initial weights, labels only, {cfg['student_steps']} fresh batches",
        "student": f"student: D's initial weights, {cfg['hard_weight']:g} labels + {1 - cfg['hard_weight']:g} "
                   f"teacher, {cfg['student_steps']} fresh batches",
    }[arm]


def render(result: dict, stats: dict) -> str:
    cfg, rows = result["config"], sorted(result["rows"], key=lambda r: r["seed"])
    seeds = stats["seeds"]
    r0 = rows[0]
    unigram = r0.get("unigram_val_loss")
    lines = [
        HEADING,
        "",
        "```sh",
        "python benchmarks/repro/lm_distillation.py " + cfg["command"],
        "```",
        "",
        f"{len(seeds)} seeds, paired (seed s: D's initial weights for D, the student and the control; one order of "
        f"training windows for every arm). D {cfg['steps']} steps, the teacher {cfg['teacher_steps']}, the student "
        f"and the control {cfg['student_steps']} from batch {cfg['teacher_steps']} of the order (`moekit distill "
        f"--init scratch --data-offset {cfg['teacher_steps']}`, hard weight {cfg['hard_weight']:g} and 1.0), 16 x "
        f"128 tokens a step, data.corpus = \"{cfg['corpus']}\"; validation loss on the whole held-out split at the "
        "end (nats/token; mean and 95 % t interval over seeds; the seed standard deviation is the noise of one run)"
        + ("" if unigram is None else f"; unigram {unigram:.3f}") + ".",
        "",
        "| arm | parameters | train FLOPs / token | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ± 95 % | seed sd |",
        "|---|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    params = {"dense": r0.get("dense_parameters"), "teacher": r0.get("teacher_parameters")}
    flops = {"dense": r0.get("dense_train_flops_per_token"), "teacher": r0.get("teacher_train_flops_per_token")}
    for arm in ARMS:
        a = stats["arms"][arm]
        kind = "teacher" if arm == "teacher" else "dense"
        lines.append(f"| {arm_label(arm, cfg)} | {_count(params[kind])} | {_count(flops[kind])} | "
                     + " | ".join(f"{x:.4f}" for x in a["per_seed"])
                     + f" | {_pm(a['mean'], a['half'])} | {a['sd']:.4f} |")
    g, c = stats["gate"], stats["claim"]
    lines += [
        "",
        "Paired by seed (first minus second):",
        "",
        "| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % | paper's side | verdict |",
        "|---|" + "---|" * len(seeds) + "---|---|---|",
        "| teacher - dense (the gate: the lead to keep) | " + " | ".join(f"{x:+.4f}" for x in g["per_seed"])
        + f" | {_pm(g['mean'], g['half'], sign=True)} | negative (the teacher better) | {g['verdict']} |",
        "| student - control | " + " | ".join(f"{x:+.4f}" for x in c["per_seed"])
        + f" | {_pm(c['mean'], c['half'], sign=True)} | {c['paper']} | {c['verdict']} |",
    ]
    for p in stats["reported"]:
        lines.append(f"| {p['a']} - {p['b']} | " + " | ".join(f"{x:+.4f}" for x in p["per_seed"])
                     + f" | {_pm(p['mean'], p['half'], sign=True)} | - | - |")
    k = stats["gain_kept"]
    cells = " | ".join("undefined" if x is None else f"{100 * x:.1f} %" for x in k["per_seed"])
    mean = "-" if math.isnan(k["mean"]) else (f"{100 * k['mean']:.1f} %" + (
        "" if math.isnan(k["half"]) else f" ± {100 * k['half']:.1f} %"))
    lines += [
        "",
        "Share of the teacher's lead kept, (control - student) / (control - teacher):",
        "",
        "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % | paper's side | verdict | Switch ~30 % |",
        "|---|" + "---|" * len(seeds) + "---|---|---|---|",
        f"| gain kept | {cells} | {mean} | positive | {k['verdict']} | {k['against_switch']} |",
        "",
        f"The student and the control start at D's initial weights on every seed: "
        f"{'yes' if stats['all_start_at_dense_init'] else 'NO (see runs.csv)'} (validation loss there "
        f"{_pm(*stats['start'])}). The student's batches are ones no arm trained on (after the teacher's last "
        f"batch, within one epoch): {'yes' if stats['all_fresh'] else 'NO (see runs.csv: a shorter corpus)'}.",
        "",
        f"![{PLOT_ALT}]({PLOT})",
    ]
    return wrap_markdown(lines) + "\n"


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    write_outputs(out, result, stats, render(result, stats), result["rows"])
    plot(stats, out / PLOT, result["rows"][0].get("unigram_val_loss"))


COLOURS = {"dense": "tab:grey", "teacher": "tab:red", "control": "tab:blue", "student": "tab:green"}


def plot(stats: dict, path: Path, unigram: float | None) -> None:
    """Left: each arm's final validation loss (mean and 95 % interval over seeds, each seed a dot); right: the share
    of the teacher's lead kept per seed, its mean and 95 % interval, against 0 and Switch's ~30 %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    low, high = math.inf, -math.inf
    for x, arm in enumerate(ARMS):
        a = stats["arms"][arm]
        half = 0.0 if math.isnan(a["half"]) else a["half"]
        left.errorbar([x], [a["mean"]], yerr=[half], color=COLOURS[arm], marker="s", ms=7, capsize=5,
                      label=f"{arm} (mean, 95 % interval)")
        left.scatter([x + 0.12] * len(a["per_seed"]), a["per_seed"], color=COLOURS[arm], s=12, alpha=0.6)
        low, high = min(low, a["mean"] - half, *a["per_seed"]), max(high, a["mean"] + half, *a["per_seed"])
    # The claim pairs the student with the control seed by seed: a thin line joins each seed's two dots.
    pairs = zip(stats["arms"]["control"]["per_seed"], stats["arms"]["student"]["per_seed"], strict=True)
    for i, (c, st) in enumerate(pairs):
        left.plot([ARMS.index("control") + 0.12, ARMS.index("student") + 0.12], [c, st], color="black", lw=0.5,
                  alpha=0.5, label="one seed, control to student" if i == 0 else None)
    pad = 0.1 * max(high - low, 1e-3)
    left.set_ylim(low - pad, high + pad)
    if unigram is not None and low - pad <= unigram <= high + pad:
        left.axhline(unigram, color="black", ls="--", lw=1, label="unigram (validation)")
    elif unigram is not None:
        left.set_title(f"unigram {unigram:.3f}, off the axis", fontsize=9)
    left.set_xticks(range(len(ARMS)), ARMS)
    left.set_ylabel("final validation loss (nats / token)")
    left.legend(fontsize=7)

    k = stats["gain_kept"]
    seeds = stats["seeds"]
    xs = [i for i, v in enumerate(k["per_seed"]) if v is not None]
    right.scatter(xs, [k["per_seed"][i] for i in xs], color="tab:green", s=20, label="one seed")
    if not math.isnan(k["mean"]):
        right.errorbar([len(seeds) + 0.5], [k["mean"]], yerr=[0.0 if math.isnan(k["half"]) else k["half"]],
                       color="black", marker="D", capsize=6, label="mean, 95 % interval over seeds")
    right.axhline(SWITCH_KEPT, color="tab:purple", ls="--", lw=1, label="Switch: about 30 %")
    right.axhline(0.0, color="black", lw=1)
    right.set_xticks([*range(len(seeds)), len(seeds) + 0.5], [*(f"seed {s}" for s in seeds), "mean"])
    right.set_ylabel("(control - student) / (control - teacher)")
    right.set_title("share of the teacher's lead kept (above 0: Switch's side)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = study_parser(__doc__, "runs/lm-distillation", seeds=5, steps=700)
    p.add_argument("--teacher-steps", type=int, help="steps of the teacher (default: twice --steps)")
    p.add_argument("--student-steps", type=int, help="steps of the student and the control (default: --steps)")
    p.add_argument("--experts", type=int, default=32, choices=(2, 4, 8, 16, 32), help="the teacher's experts")
    p.add_argument("--hard-weight", type=float, default=0.75, help="the student's label weight (Switch: 0.75)")
    return p


def prepare(args: argparse.Namespace, _parser: argparse.ArgumentParser | None = None) -> None:
    """The step counts that default to others."""
    args.teacher_steps = args.teacher_steps or 2 * args.steps
    args.student_steps = args.student_steps or args.steps


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.command = " ".join(argv)
    prepare(args)
    return args


def main(argv: list[str] | None = None) -> int:
    return study_main(parser(), argv, HEADING, study, lambda result, args: write(result, Path(args.out)), prepare)


if __name__ == "__main__":
    sys.exit(main())
