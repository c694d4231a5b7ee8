"""``moekit compare``: train several configs on the same data, token budget and seeds, and tabulate what sparsity
buys: final validation loss (mean and spread over seeds), steps and training time to the dense baseline's final
validation loss (the speedup), tokens/s, dropped tokens, parameters and FLOPs.

Why a separate module: a comparison is only meaningful when every arm sees the same tokenizer, split and token
budget, so the plan is checked for that before anything trains, and every run lives in its own directory
(``OUT/<config stem>/seed<k>/``) so an interrupted comparison resumes where it stopped: a run with
``summary.json`` is skipped, one with ``config.toml`` but no summary is resumed from its newest checkpoint.

Definitions (also in docs/TRAINING.md):

- seeds: ``--seeds N`` trains seeds ``train.seed + 0 .. N-1`` of every config.
- final validation loss: mean over the seeds whose final loss is finite; spread: sample standard deviation
  (ddof = 1; empty for one seed) and min / max.
- target: the baseline's mean final validation loss. Steps to target (per seed): the first evaluation step whose
  ``val_loss <= target``; the config's figure is the mean over seeds, or "not reached" when any seed misses it.
  The baseline itself reaches its own mean at its final evaluation by definition, so its steps to target are its
  final step and its speedup is 1. Step speedup = baseline steps / steps; the same for training seconds.
- training seconds: ``time_s`` of the metrics records (seconds in training steps, evaluations and checkpoints
  excluded) where the trainer writes it; otherwise reconstructed from each record's ``tokens_per_s`` window.
- tokens/s: tokens trained / training seconds of the whole run (all sessions).
- drop fraction: mean of the logged ``drop_fraction`` over a run's records, then over seeds (empty for dense).
- diverged: a run that raised during training (too many roll-backs, ``nonfinite = "raise"``; recorded in
  ``failed.json`` so a rerun skips it too), ended with a non-finite or missing validation loss, rolled back at
  least once (GLaM-style recovery from a divergence), or (a language model) had an evaluation whose validation
  loss exceeded ln(data.vocab_size), the loss of a uniform prediction where a freshly initialised model starts: a
  float32 run that blows up seldom produces NaN (softmax subtracts the max), its loss jumps instead. Skipped
  (non-finite) steps alone do not count.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moekit.atomic import WriteError, atomic_path, atomic_write_text, check_writable, make_dirs
from moekit.errors import MoekitError
from moekit.lab.training.run_config import RunConfig, build_run_config, load_run_config, tomllib
from moekit.training.metrics import read_metrics

__all__ = [
    "Arm",
    "CompareResult",
    "aggregate",
    "compare",
    "default_out_dir",
    "plan_arms",
    "run_curve",
    "steps_to_target",
]

SUMMARY_FILE = "summary.json"
FAILED_FILE = "failed.json"
# Keys that may differ between a run directory and the plan without changing what the run computes.
_HARMLESS_TRAIN_KEYS = ("threads", "progress", "tensorboard")
# Beyond the [data] section, these [train] keys fix the token budget and what "validation loss" measures.
_BUDGET_TRAIN_KEYS = ("max_steps", "batch_size", "eval_batches")

CSV_COLUMNS = [
    "config",
    "seeds",
    "final_val_loss_mean",
    "final_val_loss_std",
    "final_val_loss_min",
    "final_val_loss_max",
    "steps_to_baseline",
    "reached_baseline",
    "step_speedup",
    "train_seconds_to_baseline",
    "wall_speedup",
    "tokens_per_s",
    "drop_fraction",
    "parameters_total",
    "parameters_active",
    "train_flops_per_token",
    "diverged_runs",
]
ACCURACY_COLUMNS = ["final_val_accuracy_mean", "final_val_accuracy_std"]


@dataclass
class Arm:
    """One config of the comparison: its name (the file stem), where it came from, and one resolved config per
    seed."""

    name: str
    source: str
    configs: list[RunConfig]
    run_dirs: list[Path] = field(default_factory=list)

    @property
    def is_dense(self) -> bool:
        return self.configs[0].moe is None


@dataclass
class CompareResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    baseline: str | None
    target: float | None
    trained: list[Path]
    skipped: list[Path]
    files: list[Path]


def default_out_dir() -> Path:
    return Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"


def _stem(source: str) -> str:
    return Path(source).stem if source.endswith(".toml") else Path(source).name


def plan_arms(sources: list[str], seeds: int, overrides: list[str], out_dir: Path) -> list[Arm]:
    """Load every config (with the overrides), check that they share the data and token budget, and give each
    seed its run directory."""
    if not sources:
        raise MoekitError("give at least one config to compare")
    if not isinstance(seeds, int) or seeds < 1:
        raise MoekitError(f"--seeds must be an integer >= 1, got {seeds!r}")
    arms: list[Arm] = []
    seen: dict[str, str] = {}
    for source in sources:
        name = _stem(source)
        if name in seen:
            raise MoekitError(
                f"two configs have the same name {name!r} ({seen[name]} and {source}): their runs would share "
                "OUT/<name>/; rename one"
            )
        seen[name] = source
        try:
            base = load_run_config(source, overrides)
        except ValueError as exc:
            raise MoekitError(f"{source}: {exc}") from None
        configs = []
        for k in range(seeds):
            cfg = copy.deepcopy(base)
            cfg.train = dataclasses.replace(cfg.train, seed=base.train.seed + k)
            configs.append(cfg)
        run_dirs = [out_dir / name / f"seed{cfg.train.seed}" for cfg in configs]
        arms.append(Arm(name, source, configs, run_dirs))
    _check_same_budget(arms)
    return arms


def _budget(cfg: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"model.arch": cfg.arch}  # first: the task decides which [data] keys there are
    out.update({f"data.{k}": v for k, v in cfg.resolved()["data"].items()})
    out.update({f"train.{k}": getattr(cfg.train, k) for k in _BUDGET_TRAIN_KEYS})
    return out


def _check_same_budget(arms: list[Arm]) -> None:
    first = arms[0]
    ref = _budget(first.configs[0])
    for arm in arms[1:]:
        other = _budget(arm.configs[0])
        for key in ref:
            if ref[key] != other[key]:
                raise MoekitError(
                    f"configs differ in {key}: {first.name} has {ref[key]!r}, {arm.name} has {other[key]!r}; a "
                    "comparison needs the same data, token budget and evaluation (use --set to align them)"
                )


def _comparable(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in tables.items() if k != "parallel"}
    for key in _HARMLESS_TRAIN_KEYS:
        out.get("train", {}).pop(key, None)
    return out


def _check_run_dir_matches(run_dir: Path, planned: RunConfig) -> None:
    """A run directory from an earlier invocation must hold the run this plan asks for (else its numbers would
    silently stand for another config)."""
    try:
        saved = build_run_config(tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise MoekitError(
            f"{run_dir}/config.toml cannot be read ({exc}); remove {run_dir} or use another --out"
        ) from None
    a, b = _comparable(saved.resolved()), _comparable(planned.resolved())
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                raise MoekitError(
                    f"{run_dir} was trained with {section}.{key} = {sa.get(key)!r}, but this comparison asks for "
                    f"{sb.get(key)!r}; use another --out (or remove that run directory)"
                )


def _share_data(source: Path | None, run_dir: Path, files: tuple[str, ...]) -> None:
    """Give a new run the prepared data ``files`` (the task's ``data_files``: a language model's token arrays and
    tokenizer) of an earlier run of the same comparison.

    Every arm has the same [data] section (checked), so this is what the task would prepare again; sharing it
    saves the tokenizer training per run and guarantees one tokenizer and split for all arms. Each file is copied
    to a temporary name and renamed, in the task's order (the tokenizer last: ``prepare_data`` reuses them only
    when both exist)."""
    if source is None:
        return
    for rel in files:
        src, dst = source / rel, run_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _has_data(run_dir: Path, files: tuple[str, ...]) -> bool:
    return bool(files) and all((run_dir / rel).is_file() for rel in files)


def _clean(value: Any) -> Any:
    # JSON has no NaN / Infinity: write them as strings, as metrics.jsonl does.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(value), indent=1))


# ---------------------------------------------------------------------------------------------------------------
# reading a run


def _float(value: Any) -> float:
    try:
        return float(value)  # "nan" / "inf" strings stand for non-finite values
    except (TypeError, ValueError):
        return float("nan")


def run_curve(records: list[dict[str, Any]], tokens_per_step: int) -> dict[str, list[float]]:
    """The evaluation points of one run: ``step``, ``val_loss``, ``time_s`` (training seconds at that step) and,
    where logged, ``val_accuracy``; plus ``final_time_s`` and ``drop_fraction`` (mean of the logged values).

    Training seconds: a record's ``time_s`` when present; otherwise the windows of ``tokens_per_s`` are summed
    (each logged record's ``tokens_per_s`` covers the steps since the previous logged record). After a roll-back
    the step counter goes back; the clock does not.
    """
    steps: list[float] = []
    losses: list[float] = []
    times: list[float] = []
    accuracies: list[float] = []
    drops: list[float] = []
    clock, prev_step = 0.0, 0
    for r in records:
        if r.get("event") == "rollback":
            prev_step = int(r["step"])
            continue
        step = int(r["step"])
        if "time_s" in r:
            clock = _float(r["time_s"])
            prev_step = step
        elif "tokens_per_s" in r:
            tps = _float(r["tokens_per_s"])
            if tps > 0 and math.isfinite(tps):
                clock += max(0, step - prev_step) * tokens_per_step / tps
            prev_step = step
        if "drop_fraction" in r:
            drops.append(_float(r["drop_fraction"]))
        if "val_loss" in r:
            steps.append(step)
            losses.append(_float(r["val_loss"]))
            times.append(clock)
            if "val_accuracy" in r:
                accuracies.append(_float(r["val_accuracy"]))
    finite_drops = [d for d in drops if math.isfinite(d)]
    return {
        "step": steps,
        "val_loss": losses,
        "time_s": times,
        "val_accuracy": accuracies,
        "final_time_s": clock,
        "final_step": float(records[-1]["step"]) if records else 0.0,
        "drop_fraction": float(np.mean(finite_drops)) if finite_drops else None,
    }


def steps_to_target(curve: dict[str, Any], target: float) -> tuple[float, float] | None:
    """(step, training seconds) of the first evaluation whose validation loss is <= ``target``; None if none."""
    for step, loss, t in zip(curve["step"], curve["val_loss"], curve["time_s"], strict=True):
        if math.isfinite(loss) and loss <= target:
            return step, t
    return None


def _read_run(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    # What the trainer counts per step: batch x seq_len tokens for a language model, batch images for a classifier.
    tokens_per_step = cfg.train.batch_size * cfg.task.units_per_row(cfg)
    records = read_metrics(run_dir / "metrics.jsonl")
    curve = run_curve(records, tokens_per_step)
    run: dict[str, Any] = {"run_dir": str(run_dir), "seed": cfg.train.seed, "curve": curve}
    failed = run_dir / FAILED_FILE
    if failed.is_file():
        run.update(json.loads(failed.read_text(encoding="utf-8")))
        run["failed"] = True
        run["final_val_loss"] = None
    else:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        run.update({k: v for k, v in summary.items() if k != "plots"})
        run["failed"] = False
    final = run.get("final_val_loss")
    run["final_val_loss"] = None if final is None else _float(final)
    # An evaluation above the task's ceiling (a language model: ln(V), where a fresh model starts) is a blow-up.
    # In float32 a blown-up model seldom gives NaN (softmax subtracts the max), its loss jumps.
    ceiling = cfg.task.loss_ceiling(cfg)
    finite_losses = [v for v in curve["val_loss"] if math.isfinite(v)]
    run["max_val_loss"] = max(finite_losses) if finite_losses else None
    spiked = ceiling is not None and run["max_val_loss"] is not None and run["max_val_loss"] > ceiling
    run["diverged"] = bool(
        run["failed"]
        or run["final_val_loss"] is None
        or not math.isfinite(run["final_val_loss"])
        or int(run.get("rollbacks") or 0) > 0
        or spiked
    )
    steps_done = curve["final_step"]
    run["tokens_per_s_all"] = (
        steps_done * tokens_per_step / curve["final_time_s"] if curve["final_time_s"] > 0 else None
    )
    return run


# ---------------------------------------------------------------------------------------------------------------
# aggregation


def _stats(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(np.mean(vals)),
        "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
        "min": float(min(vals)),
        "max": float(max(vals)),
        "n": len(vals),
    }


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def aggregate(
    arm_runs: dict[str, list[dict[str, Any]]], baseline: str | None
) -> tuple[list[dict[str, Any]], float | None]:
    """One row per config (see the module docstring for each definition); returns the rows and the target loss
    (the baseline's mean final validation loss; None without a baseline)."""
    target = None
    baseline_steps = baseline_time = None
    if baseline is not None:
        base_runs = arm_runs[baseline]
        target = _stats([r["final_val_loss"] for r in base_runs])["mean"]
        finished = [r for r in base_runs if r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])]
        # The baseline reaches its own mean final loss at its final evaluation (on average over seeds).
        baseline_steps = _mean([r["curve"]["step"][-1] for r in finished if r["curve"]["step"]])
        baseline_time = _mean([r["curve"]["time_s"][-1] for r in finished if r["curve"]["step"]])
    rows = []
    for name, runs in arm_runs.items():
        loss = _stats([r["final_val_loss"] for r in runs])
        row: dict[str, Any] = {
            "config": name,
            "seeds": len(runs),
            "final_val_loss_mean": loss["mean"],
            "final_val_loss_std": loss["std"],
            "final_val_loss_min": loss["min"],
            "final_val_loss_max": loss["max"],
        }
        if target is not None:
            if name == baseline:
                steps, seconds, reached = baseline_steps, baseline_time, len(runs)
            else:
                hits = [steps_to_target(r["curve"], target) for r in runs]
                reached = sum(h is not None for h in hits)
                complete = reached == len(runs)
                steps = _mean([h[0] for h in hits]) if complete else None
                seconds = _mean([h[1] for h in hits]) if complete else None
            row["steps_to_baseline"] = steps
            row["reached_baseline"] = f"{reached}/{len(runs)}"
            row["step_speedup"] = baseline_steps / steps if steps and baseline_steps else None
            row["train_seconds_to_baseline"] = seconds
            row["wall_speedup"] = baseline_time / seconds if seconds and baseline_time else None
        else:
            for key in ("steps_to_baseline", "reached_baseline", "step_speedup", "train_seconds_to_baseline",
                        "wall_speedup"):
                row[key] = None
        first = next((r for r in runs if "parameters_total" in r), {})
        row["tokens_per_s"] = _mean([r["tokens_per_s_all"] for r in runs])
        row["drop_fraction"] = _mean([r["curve"]["drop_fraction"] for r in runs])
        row["parameters_total"] = first.get("parameters_total")
        row["parameters_active"] = first.get("parameters_active")
        row["train_flops_per_token"] = first.get("train_flops_per_token")
        row["diverged_runs"] = f"{sum(r['diverged'] for r in runs)}/{len(runs)}"
        if any(r.get("final_val_accuracy") is not None for r in runs):
            acc = _stats([r.get("final_val_accuracy") for r in runs])
            row["final_val_accuracy_mean"] = acc["mean"]
            row["final_val_accuracy_std"] = acc["std"]
        rows.append(row)
    return rows, target


# ---------------------------------------------------------------------------------------------------------------
# output


def _columns(rows: list[dict[str, Any]], with_speedup: bool) -> list[str]:
    cols = list(CSV_COLUMNS)
    if not with_speedup:
        cols = [c for c in cols if c not in ("steps_to_baseline", "reached_baseline", "step_speedup",
                                             "train_seconds_to_baseline", "wall_speedup")]
    if any("final_val_accuracy_mean" in r for r in rows):
        cols[cols.index("final_val_loss_max") + 1:cols.index("final_val_loss_max") + 1] = ACCURACY_COLUMNS
    return cols


def to_csv(rows: list[dict[str, Any]], with_speedup: bool) -> str:
    cols = _columns(rows, with_speedup)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in cols])
    return buf.getvalue()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def to_markdown(rows: list[dict[str, Any]], baseline: str | None, target: float | None) -> str:
    with_speedup = target is not None
    with_acc = any("final_val_accuracy_mean" in r for r in rows)
    head = ["config", "seeds", "final val loss (mean ± std [min, max])"]
    if with_acc:
        head.append("final val accuracy (mean ± std)")
    if with_speedup:
        head += ["steps to baseline loss", "step speedup", "train s to baseline loss", "time speedup"]
    head += ["tokens/s", "drop fraction", "params total", "params active", "train MFLOP/token", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loss = _fmt(r["final_val_loss_mean"])
        if r["final_val_loss_std"] is not None:
            loss += f" ± {r['final_val_loss_std']:.3f} [{r['final_val_loss_min']:.3f}, {r['final_val_loss_max']:.3f}]"
        cells = [r["config"], str(r["seeds"]), loss]
        if with_acc:
            acc = _fmt(r.get("final_val_accuracy_mean"), 4)
            if r.get("final_val_accuracy_std") is not None:
                acc += f" ± {r['final_val_accuracy_std']:.4f}"
            cells.append(acc)
        if with_speedup:
            if r["steps_to_baseline"] is None:
                steps = f"not reached ({r['reached_baseline']})"
                seconds = "-"
            else:
                steps = f"{r['steps_to_baseline']:.0f}"
                seconds = f"{r['train_seconds_to_baseline']:.1f}"
            speed = "-" if r["step_speedup"] is None else f"{r['step_speedup']:.2f}x"
            wall = "-" if r["wall_speedup"] is None else f"{r['wall_speedup']:.2f}x"
            cells += [steps, speed, seconds, wall]
        flops = r["train_flops_per_token"]
        cells += [
            "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
            _fmt(r["drop_fraction"]),
            "-" if r["parameters_total"] is None else f"{r['parameters_total']:,}",
            "-" if r["parameters_active"] is None else f"{r['parameters_active']:,}",
            "-" if flops is None else f"{flops / 1e6:.2f}",
            r["diverged_runs"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if with_speedup:
        notes.append(
            f"Baseline: {baseline}, mean final validation loss {target:.4f}. Steps to baseline loss: first "
            "evaluation step at or below it, mean over seeds (\"not reached\" when a seed misses it); speedup = "
            "baseline's steps (or training seconds) / the config's."
        )
    notes.append(
        "Spread: sample std over seeds (ddof 1) and [min, max]. Training seconds exclude evaluation and "
        "checkpoints. Diverged: raised, ended non-finite, rolled back, or "
        "had a validation loss above ln(vocabulary) (worse than uniform)."
    )
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _band(
    runs: list[dict[str, Any]], key: str, metric: str = "val_loss"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """x (mean over seeds of ``key`` at each evaluation the seeds share), and the mean, min and max of ``metric``
    ("val_loss" or "val_accuracy")."""
    curves = [r["curve"] for r in runs if r["curve"][metric]]
    if not curves:
        return None
    n = min(len(c[metric]) for c in curves)
    x = np.mean([c[key][:n] for c in curves], axis=0)
    y = np.array([c[metric][:n] for c in curves], dtype=float)
    with np.errstate(all="ignore"):
        y = np.where(np.isfinite(y), y, np.nan)
        if np.isnan(y).all(axis=0).any():
            keep = ~np.isnan(y).all(axis=0)
            x, y = x[keep], y[:, keep]
        return x, np.nanmean(y, axis=0), np.nanmin(y, axis=0), np.nanmax(y, axis=0)


def plot_compare(
    arm_runs: dict[str, list[dict[str, Any]]], target: float | None, path: Path, metric: str = "val_loss",
    *, per: str = "token",
) -> Path:
    """:func:`compare_figure` saved as a PNG at ``path``."""
    fig = compare_figure(arm_runs, target, metric, per=per)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def compare_figure(
    arm_runs: dict[str, list[dict[str, Any]]], target: float | None, metric: str = "val_loss", *, per: str = "token"
) -> Any:
    """Validation loss (nats per ``per``; or, ``metric = "val_accuracy"``, a classifier's accuracy) vs step and vs
    training seconds: mean over seeds, min-max band. ``target`` (a loss) is drawn on the loss plot only. Returns the
    matplotlib Figure."""
    is_loss = metric == "val_loss"
    from matplotlib.figure import Figure  # the object API: no pyplot, no backend switch

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for name, runs in arm_runs.items():
        for ax, key in zip(axes, ("step", "time_s"), strict=True):
            band = _band(runs, key, metric)
            if band is None:
                continue
            x, mean, lo, hi = band
            (line,) = ax.plot(x, mean, "o-", ms=2.5, lw=1.5, label=name)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    for ax, label in zip(axes, ("optimizer step", "training time (s, evaluation excluded)"), strict=True):
        if target is not None and is_loss:
            ax.axhline(target, color="grey", ls="--", lw=1, label=f"baseline's final loss {target:.3f}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation cross-entropy (nats per {per})" if is_loss
                       else f"validation accuracy (fraction of {per}s)")
    finite = [v for runs in arm_runs.values() for r in runs for v in r["curve"][metric] if math.isfinite(v)]
    if finite and is_loss:
        # Zoom on the informative range: the first evaluations of a fresh model are far above the rest.
        lo, hi = min(finite), float(np.percentile(finite, 90))
        axes[0].set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    axes[0].legend(fontsize=8)
    seeds = max(len(r) for r in arm_runs.values())
    what = "validation loss" if is_loss else "validation accuracy"
    fig.suptitle(f"{what}, mean over {seeds} seed(s)" + (", band = min-max" if seeds > 1 else ""))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# the command


def compare(
    sources: list[str],
    *,
    seeds: int = 1,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    baseline: str | None = None,
    log: Callable[[str], None] | None = None,
    train: Callable[..., dict[str, Any]] | None = None,
) -> CompareResult:
    """Train every (config, seed) not yet finished in ``out_dir``, then write ``compare.csv``, ``compare.md``,
    ``compare.json`` and ``val_loss.png`` there (and ``val_accuracy.png`` for classifiers). ``train`` defaults to
    :func:`moekit.lab.training.run.train_run`, which leaves the thread count alone; ``moekit compare`` passes
    :func:`moekit.lab.runtime.train_run_with_threads` so that each run's ``train.threads`` applies."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if train is None:
        from moekit.lab.training.run import train_run as train
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    arms = plan_arms(sources, seeds, list(overrides or []), out)
    names = [a.name for a in arms]
    if baseline is None:
        baseline = next((a.name for a in arms if a.is_dense), None)
    elif baseline == "none":  # what --help promises: no speedup columns even with a dense arm
        baseline = None
    elif baseline not in names:
        raise MoekitError(f"--baseline {baseline!r} is not one of the configs ({', '.join(names)})")

    # Check every existing run directory before training anything: a mismatch found late would waste the work.
    for arm in arms:
        for cfg, run_dir in zip(arm.configs, arm.run_dirs, strict=True):
            if (run_dir / "config.toml").is_file():
                _check_run_dir_matches(run_dir, cfg)
    # And that the results can be written, before hours of training: a full or read-only disk is one line now.
    check_writable(out)
    make_dirs(out)
    total = sum(len(a.run_dirs) for a in arms)
    trained, skipped = [], []
    data_files = arms[0].configs[0].task.data_files  # one task: the arms share the [data] section
    data_source = next((d for a in arms for d in a.run_dirs if _has_data(d, data_files)), None)
    index = 0
    for arm in arms:
        for cfg, run_dir in zip(arm.configs, arm.run_dirs, strict=True):
            index += 1
            tag = f"[{index}/{total}] {arm.name} seed {cfg.train.seed}"
            if (run_dir / SUMMARY_FILE).is_file() or (run_dir / FAILED_FILE).is_file():
                log(f"{tag}: finished earlier, skipped ({run_dir})")
                skipped.append(run_dir)
                continue
            resume = (run_dir / "config.toml").is_file()
            log(f"{tag}: {'resuming' if resume else 'training'} in {run_dir}")
            if not resume and not _has_data(run_dir, data_files):
                _share_data(data_source, run_dir, data_files)
            try:
                # On a resume the planned config (checked equal to the saved one up to threads / progress) lets
                # this invocation's train.threads apply.
                train(cfg, run_dir, resume=resume, log=log)
            except WriteError:
                raise  # a full or read-only disk is the machine's state, not the run's failure: stop, resumable
            except MoekitError as exc:
                if not (run_dir / "metrics.jsonl").is_file():
                    raise  # it never started training: a user error (corpus, config), not a divergence
                log(f"{tag}: failed: {exc}")
                _write_json(run_dir / FAILED_FILE, {"error": str(exc)})
            trained.append(run_dir)
            if data_source is None and _has_data(run_dir, data_files):
                data_source = run_dir

    arm_runs = {
        arm.name: [_read_run(d, c) for c, d in zip(arm.configs, arm.run_dirs, strict=True)] for arm in arms
    }
    rows, target = aggregate(arm_runs, baseline)
    files = [out / "compare.csv", out / "compare.md", out / "compare.json", out / "val_loss.png"]
    atomic_write_text(files[0], to_csv(rows, target is not None))
    atomic_write_text(files[1], to_markdown(rows, baseline, target))
    _write_json(
        files[2],
        {
            "configs": {a.name: a.source for a in arms},
            "seeds": seeds,
            "overrides": list(overrides or []),
            "baseline": baseline,
            "baseline_final_val_loss": target,
            "rows": rows,
            "runs": arm_runs,
        },
    )
    classifier = any(r["curve"]["val_accuracy"] for runs in arm_runs.values() for r in runs)
    plot_compare(arm_runs, target, files[3], per="image" if classifier else "token")
    if classifier:
        files.append(plot_compare(arm_runs, None, out / "val_accuracy.png", metric="val_accuracy", per="image"))
    return CompareResult(out, rows, baseline, target, trained, skipped, files)
