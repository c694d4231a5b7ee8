"""``moekit distill`` end to end: build the FLOP-matched dense student of a trained MoE run, initialise it from
the teacher, train it on the teacher's data with the distillation loss, and report how much of the teacher's gain
over a dense model trained alone the student keeps.

The student's run directory is an ordinary dense run (``config.toml``, tokenizer, token arrays, checkpoints,
``metrics.jsonl``, plots, ``summary.json``) plus ``distill.json``. Training reuses the trainer whole (optimizer,
schedule, batches, checkpoint writer, evaluation) through :class:`moekit.distill.model.DistilledLM`.

Gain kept (Switch section 4.2): with validation cross-entropies ``L_dense`` (the dense baseline trained alone),
``L_teacher`` and ``L_student`` on the same validation windows,
``kept = (L_dense - L_student) / (L_dense - L_teacher)``: 0 = no better than the dense model, 1 = as good as the
teacher.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.analysis.trace import iter_windows, trace_model
from moekit.atomic import atomic_write_text
from moekit.data.batches import TokenBatches, eval_windows, unigram_cross_entropy
from moekit.distill.loss import HARD_WEIGHT
from moekit.distill.model import DistilledLM
from moekit.distill.student import copy_non_expert_weights, expert_usage, init_student_ffns, student_config
from moekit.errors import MoekitError
from moekit.lab.training.plots import plot_run
from moekit.lab.training.run import default_run_dir, load_trained_run
from moekit.lab.training.run_config import build_run_config, parse_overrides, to_toml
from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE
from moekit.models import TransformerLM, parameter_counts
from moekit.training.trainer import Trainer

__all__ = ["distill_run", "evaluate_lm", "gain_kept"]

USAGE_BATCHES = 8  # training batches the teacher routes to measure expert usage for the "top"/"mean" inits


@torch.no_grad()
def evaluate_lm(model: TransformerLM, val_tokens: np.ndarray, batch_size: int, seq_len: int,
                max_batches: int | None) -> float:
    """Mean validation cross-entropy on the trainer's fixed validation windows (same as ``Trainer.evaluate``)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in eval_windows(val_tokens, batch_size, seq_len, max_batches):
            out = model(inputs, targets)
            total += float(out.ce_loss) * targets.numel()
            count += targets.numel()
    finally:
        model.train(was)
    return total / count


def gain_kept(dense_loss: float, teacher_loss: float, student_loss: float) -> float | None:
    """``(L_dense - L_student) / (L_dense - L_teacher)``; None when the teacher is no better than the dense model."""
    gain = dense_loss - teacher_loss
    if gain <= 0:
        return None
    return (dense_loss - student_loss) / gain


def distill_run(
    teacher_dir: str | Path,
    run_dir: str | Path | None = None,
    *,
    init: str = "mean",
    dense_baseline: str | Path | None = None,
    overrides: list[str] | None = None,
    hard_weight: float = HARD_WEIGHT,
    fallback: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Distil the MoE run in ``teacher_dir`` into its FLOP-matched dense model; returns ``distill.json``'s dict.

    ``hard_weight`` is Switch's 0.75; other values are for ablations (1.0: no teacher term, plain training of the
    initialised student)."""
    if not 0.0 <= hard_weight <= 1.0:
        raise MoekitError(f"the label weight must be in [0, 1], got {hard_weight}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    teacher = load_trained_run(teacher_dir, fallback=fallback, warn=log, command="distill")
    if not teacher.model.moe_layers:
        raise MoekitError(f"{teacher_dir} is a dense model: distillation needs an MoE teacher")
    parsed = parse_overrides(overrides or [])
    if set(parsed) - {"train"}:
        raise MoekitError("moekit distill: --set may change train.* keys only (the student's shape is fixed)")
    tables = teacher.config.resolved()
    tables.pop("moe", None)
    s_lm = student_config(teacher.model.config)
    tables["model"]["dense_d_ff_at_moe"] = s_lm.dense_d_ff_at_moe
    # The student starts from the weights built below, not from the initial weights of an imported or upcycled
    # teacher (train.init_from names a file in the teacher's run directory).
    tables["train"]["init_from"] = None
    tables["train"].update(parsed.get("train", {}))
    run_config = build_run_config(tables)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(f"distill-{init}")
    if (run_dir / "config.toml").exists():
        raise MoekitError(f"{run_dir} already holds a run; choose another --run-dir")
    baseline = None
    if dense_baseline is not None:
        baseline = load_trained_run(dense_baseline, fallback=fallback, warn=log, command="distill")
        if baseline.model.moe_layers:
            raise MoekitError(f"--dense-baseline {dense_baseline} is an MoE run, not a dense one")
        if not np.array_equal(baseline.data.val_tokens, teacher.data.val_tokens):
            raise MoekitError(
                f"--dense-baseline {dense_baseline} was trained on other validation tokens (another corpus or "
                "tokenizer) than the teacher: the losses are not comparable"
            )
    tc = run_config.train  # tc.threads is the caller's to apply (moekit distill does): a process-wide setting
    seq_len = run_config.data.seq_len

    # The run directory is an ordinary dense run over the teacher's own data and tokenizer.
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(teacher.run_dir / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
    shutil.copyfile(teacher.run_dir / TOKENS_FILE, run_dir / TOKENS_FILE)
    atomic_write_text(run_dir / "config.toml", to_toml(run_config.resolved()))

    torch.manual_seed(tc.seed)
    student = DistilledLM(run_config.task.model_for_data(run_config, teacher.data), hard_weight=hard_weight)
    copied = copy_non_expert_weights(teacher.model, student)
    usage_tokens = teacher.data.train_tokens[: USAGE_BATCHES * tc.batch_size * seq_len]
    usage = expert_usage(trace_model(teacher.model, iter_windows(usage_tokens, seq_len, tc.batch_size, None)))
    ffn_init = init_student_ffns(teacher.model, student, init, usage)

    def val(model: TransformerLM) -> float:
        return evaluate_lm(model, teacher.data.val_tokens, tc.batch_size, seq_len, tc.eval_batches)

    teacher_loss = val(teacher.model)
    student_init_loss = val(student)
    baseline_loss = val(baseline.model) if baseline is not None else None
    log(
        f"teacher {teacher.run_dir} (step {teacher.step}): validation {teacher_loss:.4f}; student after "
        f"'{init}' initialisation, before training: {student_init_loss:.4f}"
    )
    student.set_teacher(teacher.model)
    t_counts = parameter_counts(teacher.model.config)
    s_counts = parameter_counts(student.config)
    info: dict[str, Any] = {
        "teacher_run": str(teacher.run_dir),
        "teacher_checkpoint": str(teacher.checkpoint),
        "init": init,
        "hard_weight": hard_weight,
        "copied_parameters": copied,
        "ffn_init": ffn_init,
        "teacher_usage": usage,
    }
    batches = TokenBatches(teacher.data.train_tokens, tc.batch_size, seq_len, tc.seed)
    trainer = Trainer(tc, student, batches, teacher.data.val_tokens, run_dir,
                      extra_state={"config": run_config.resolved(), "distill": {"init": init}}, log=log)
    result = trainer.fit()
    student_loss = result.final_val_loss if result.final_val_loss is not None else val(student)
    unigram = unigram_cross_entropy(
        teacher.data.train_tokens, teacher.data.val_tokens, teacher.data.vocab_size, seq_len,
        None if tc.eval_batches is None else tc.eval_batches * tc.batch_size,
    )
    try:
        plot_run(run_dir, unigram)
    except Exception as exc:  # a plotting failure must not lose a finished run
        log(f"plotting failed: {exc}")
    info.update(
        {
            "steps": result.step,
            "teacher_val_loss": teacher_loss,
            "student_init_val_loss": student_init_loss,
            "student_val_loss": student_loss,
            "dense_baseline_run": None if baseline is None else str(baseline.run_dir),
            "dense_baseline_val_loss": baseline_loss,
            "gain_kept": None if baseline_loss is None else gain_kept(baseline_loss, teacher_loss, student_loss),
            "teacher_parameters": t_counts["total"],
            "student_parameters": s_counts["total"],
            "parameter_ratio": s_counts["total"] / t_counts["total"],
            "teacher_active_parameters": t_counts["active"],
            "student_active_parameters": s_counts["active"],
            "unigram_val_loss": unigram,
            "train_seconds": result.elapsed_s,
            "tokens_per_s": result.tokens_per_s,
        }
    )
    (run_dir / "distill.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    summary = {
        "run_dir": str(run_dir),
        "steps": result.step,
        "final_val_loss": student_loss,
        "final_val_perplexity": float(np.exp(student_loss)),
        "unigram_val_loss": unigram,
        "distilled_from": str(teacher.run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    info["run_dir"] = str(run_dir)
    return info
