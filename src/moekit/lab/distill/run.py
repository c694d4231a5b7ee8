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

An encoder-decoder teacher (``model.arch = "seq2seq"``) gets its FLOP-matched dense encoder-decoder
(``seq2seq_flop_matched_dense``), initialised per stack, trained on span-corruption batches with the same mixed
loss per target token, and evaluated on the run's fixed span-corruption validation examples. Its batches are FRESH:
the student's ``train.seed`` (which seeds the window order and the span masks) is the teacher's plus one, so it does
not replay the teacher's exact batches (``--set train.seed=N`` chooses another). A decoder LM student keeps the
teacher's seed by default (its batches are the teacher's, in the teacher's order); ``--set train.seed=N`` gives it
a fresh order.

Where the student starts and what it trains on (an experiment's controls): ``init = "scratch"`` copies nothing from
the teacher, so the student starts at its own fresh initialisation (``torch.manual_seed(train.seed)`` right before
the model is built, as ``moekit train`` initialises a dense run of the student's config with that seed);
``data_offset`` skips that many batches of the student's data order before its first step. With the teacher's seed
and an offset of the teacher's step count, the student trains on the windows that follow the teacher's last batch,
none of which the teacher saw while both fit in one epoch (``teacher_batches_replayed`` and ``batches_per_epoch`` in
``distill.json`` say how it went).
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

from moekit.analysis.trace import iter_windows, trace_model, trace_seq2seq
from moekit.atomic import atomic_write_text
from moekit.data.batches import TokenBatches, eval_windows, unigram_cross_entropy
from moekit.distill.loss import HARD_WEIGHT
from moekit.distill.model import DistilledLM, DistilledSeq2Seq
from moekit.distill.student import (
    INIT_METHODS,
    copy_non_expert_weights,
    expert_usage,
    init_seq2seq_student_ffns,
    init_student_ffns,
    seq2seq_student_config,
    student_config,
)
from moekit.errors import MoekitError
from moekit.lab.training.plots import plot_run
from moekit.lab.training.run import LoadedRun, default_run_dir, load_trained_run
from moekit.lab.training.run_config import build_run_config, parse_overrides, to_toml
from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE
from moekit.models import TransformerLM, parameter_counts
from moekit.models.seq2seq_config import STACKS
from moekit.models.seq2seq_flops import seq2seq_flops_per_token, seq2seq_parameter_counts
from moekit.training.trainer import EvalData, Trainer

__all__ = ["STUDENT_INITS", "distill_run", "evaluate_data", "evaluate_lm", "gain_kept", "teacher_batches_replayed"]

USAGE_BATCHES = 8  # training batches the teacher routes to measure expert usage for the "top"/"mean" inits
# How the student starts: the FFN methods of moekit.distill.student (every non-expert weight copied from the teacher),
# or "scratch": nothing copied, the student's own fresh initialisation.
STUDENT_INITS = (*INIT_METHODS, "scratch")


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


@torch.no_grad()
def evaluate_data(model: torch.nn.Module, eval_data: EvalData, batch_size: int, max_batches: int | None) -> float:
    """Mean validation cross-entropy over any :class:`EvalData`'s fixed batches, weighted as ``Trainer.evaluate``
    weights them (by the targets' element count)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in eval_data.batches(batch_size, max_batches):
            out = model(inputs, targets)
            total += float(out.ce_loss) * targets.numel()
            count += targets.numel()
    finally:
        model.train(was)
    return total / count


def distill_objective(hard_weight: float) -> str:
    """How the loss plot names the student's training loss (Switch 4.2's mix of the two cross-entropies)."""
    return f"{hard_weight:g} x label CE + {1 - hard_weight:g} x CE against the teacher"


def gain_kept(dense_loss: float, teacher_loss: float, student_loss: float) -> float | None:
    """``(L_dense - L_student) / (L_dense - L_teacher)``; None when the teacher is no better than the dense model."""
    gain = dense_loss - teacher_loss
    if gain <= 0:
        return None
    return (dense_loss - student_loss) / gain


def teacher_batches_replayed(teacher_seed: int, teacher_batch_size: int, teacher_steps: int, student_seed: int,
                             student_batch_size: int, data_offset: int, student_steps: int) -> int | None:
    """How many of the student's batches are batches the teacher trained on. With the same seed and batch size both
    walk the same order of batches, the teacher over positions ``[0, teacher_steps)``, the student over
    ``[data_offset, data_offset + student_steps)``; None when the orders differ (another seed or batch size: no batch
    recurs whole, though single windows may)."""
    if teacher_seed != student_seed or teacher_batch_size != student_batch_size:
        return None
    return max(0, min(teacher_steps, data_offset + student_steps) - data_offset)


def _data_record(teacher: LoadedRun, tc: Any, data_offset: int, batches: Any) -> dict[str, Any]:
    """What ``distill.json`` says about the student's batches against the teacher's."""
    t = teacher.config.train
    return {
        "teacher_data_seed": t.seed,
        "student_data_seed": tc.seed,
        "data_offset_batches": data_offset,
        "teacher_steps": teacher.step,
        "batches_per_epoch": batches.batches_per_epoch(),
        "teacher_batches_replayed": teacher_batches_replayed(
            t.seed, t.batch_size, teacher.step, tc.seed, tc.batch_size, data_offset, tc.max_steps
        ),
    }


def _check_start(init: str, data_offset: int) -> None:
    if init not in STUDENT_INITS:
        raise MoekitError(f"unknown student initialisation {init!r}; choose one of {', '.join(STUDENT_INITS)}")
    if isinstance(data_offset, bool) or not isinstance(data_offset, int) or data_offset < 0:
        raise MoekitError(f"the data offset must be a non-negative number of batches, got {data_offset!r}")


def _outcome(
    steps: int, teacher_loss: float, student_init_loss: float, student_loss: float, baseline: LoadedRun | None,
    baseline_loss: float | None, t_counts: dict[str, int], s_counts: dict[str, int],
) -> dict[str, Any]:
    """The figures every distillation reports: losses, the share of the gain kept, parameter counts."""
    return {
        "steps": steps,
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
    }


def distill_run(
    teacher_dir: str | Path,
    run_dir: str | Path | None = None,
    *,
    init: str = "mean",
    dense_baseline: str | Path | None = None,
    overrides: list[str] | None = None,
    hard_weight: float = HARD_WEIGHT,
    data_offset: int = 0,
    fallback: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Distil the MoE run in ``teacher_dir`` into its FLOP-matched dense model; returns ``distill.json``'s dict.

    ``hard_weight`` is Switch's 0.75; other values are for ablations (1.0: no teacher term, plain training of the
    initialised student). ``init``: one of :data:`STUDENT_INITS` (``"scratch"``: nothing copied from the teacher).
    ``data_offset``: batches of the student's data order skipped before its first step (see the module docstring)."""
    if not 0.0 <= hard_weight <= 1.0:
        raise MoekitError(f"the label weight must be in [0, 1], got {hard_weight}")
    _check_start(init, data_offset)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    teacher = load_trained_run(teacher_dir, fallback=fallback, warn=log, command="distill")
    if not teacher.model.moe_layers:
        raise MoekitError(f"{teacher_dir} is a dense model: distillation needs an MoE teacher")
    parsed = parse_overrides(overrides or [])
    if set(parsed) - {"train"}:
        raise MoekitError("moekit distill: --set may change train.* keys only (the student's shape is fixed)")
    if teacher.config.arch == "seq2seq":
        return _distill_seq2seq(teacher, run_dir, init=init, dense_baseline=dense_baseline, parsed=parsed,
                                hard_weight=hard_weight, data_offset=data_offset, fallback=fallback, log=log)
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
    copied: list[str] = []
    usage: list[dict[str, Any]] | None = None
    ffn_init: list[dict[str, Any]] = []
    if init != "scratch":
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
    batches.skip(data_offset)
    info.update(_data_record(teacher, tc, data_offset, batches))
    log(
        f"student batches: train.seed {tc.seed}, from batch {data_offset} of that order; "
        f"{info['teacher_batches_replayed'] if info['teacher_batches_replayed'] is not None else 'none whole'} "
        f"of its {tc.max_steps} batches are the teacher's"
    )
    trainer = Trainer(tc, student, batches, teacher.data.val_tokens, run_dir,
                      extra_state={"config": run_config.resolved(), "distill": {"init": init}}, log=log)
    result = trainer.fit()
    student_loss = result.final_val_loss if result.final_val_loss is not None else val(student)
    unigram = unigram_cross_entropy(
        teacher.data.train_tokens, teacher.data.val_tokens, teacher.data.vocab_size, seq_len,
        None if tc.eval_batches is None else tc.eval_batches * tc.batch_size,
    )
    try:
        plot_run(run_dir, unigram, teacher_loss=teacher_loss, objective=distill_objective(hard_weight))
    except Exception as exc:  # a plotting failure must not lose a finished run
        log(f"plotting failed: {exc}")
    info.update(
        {
            **_outcome(result.step, teacher_loss, student_init_loss, student_loss, baseline, baseline_loss,
                       t_counts, s_counts),
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


def _seq2seq_baseline(
    dense_baseline: str | Path, teacher: LoadedRun, fallback: bool, log: Callable[[str], None]
) -> LoadedRun:
    """The ``--dense-baseline`` run of an encoder-decoder teacher: a dense seq2seq run whose validation examples are
    the teacher's (same tokens, example length and corruption), so the losses compare."""
    baseline = load_trained_run(dense_baseline, fallback=fallback, warn=log, command="distill")
    if baseline.config.arch != "seq2seq":
        raise MoekitError(
            f"--dense-baseline {dense_baseline} is not an encoder-decoder run (model.arch = "
            f"{baseline.config.arch!r}): the teacher is one"
        )
    if baseline.model.moe_layers:
        raise MoekitError(f"--dense-baseline {dense_baseline} is an MoE run, not a dense one")
    t, b = teacher.config.data, baseline.config.data
    same = [getattr(t, k) == getattr(b, k) for k in ("seq_len", "noise_density", "mean_span_length", "sentinels")]
    if not np.array_equal(baseline.data.val_tokens, teacher.data.val_tokens) or not all(same):
        raise MoekitError(
            f"--dense-baseline {dense_baseline} was trained on other validation examples (another corpus, tokenizer, "
            "data.seq_len or span corruption) than the teacher: the losses are not comparable"
        )
    return baseline


def _distill_seq2seq(
    teacher: LoadedRun, run_dir: str | Path | None, *, init: str, dense_baseline: str | Path | None,
    parsed: dict[str, Any], hard_weight: float, data_offset: int, fallback: bool, log: Callable[[str], None],
) -> dict[str, Any]:
    """:func:`distill_run` for an encoder-decoder teacher (see the module docstring)."""
    layers = teacher.model.moe_layers
    if any(m.config.router != "topk" for m in layers):
        raise MoekitError(
            "moekit distill: an encoder-decoder teacher needs token-choice (top-k) MoE layers (the student's width "
            "is top_k x d_ff, and its initialisation reads the teacher's routing)"
        )
    if any(m.config.num_shared_experts for m in layers):
        raise MoekitError("moekit distill: an encoder-decoder teacher with shared experts is not supported")
    t_cfg = teacher.model.config
    s_cfg = seq2seq_student_config(t_cfg)
    tables = teacher.config.resolved()
    tables.pop("moe", None)
    for stack in STACKS:
        tables["model"][f"{stack}_dense_d_ff_at_moe"] = getattr(s_cfg, f"{stack}_dense_d_ff_at_moe")
    tables["train"]["init_from"] = None
    teacher_seed = teacher.config.train.seed
    # Fresh batches: another seed gives another window order and other span masks than the teacher trained on.
    tables["train"]["seed"] = teacher_seed + 1
    tables["train"].update(parsed.get("train", {}))
    run_config = build_run_config(tables)
    task = run_config.task
    if task.model_for_data(run_config, teacher.data) != s_cfg:
        raise MoekitError("moekit distill: the student's run config does not rebuild the FLOP-matched dense model")
    tc = run_config.train
    replayed = teacher_batches_replayed(teacher_seed, teacher.config.train.batch_size, teacher.step, tc.seed,
                                        tc.batch_size, data_offset, tc.max_steps)
    if replayed:
        log(f"warning: train.seed = {tc.seed} is the teacher's: the student replays {replayed} of the teacher's "
            "exact batches")
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(f"distill-{init}")
    if (run_dir / "config.toml").exists():
        raise MoekitError(f"{run_dir} already holds a run; choose another --run-dir")
    baseline = None if dense_baseline is None else _seq2seq_baseline(dense_baseline, teacher, fallback, log)

    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(teacher.run_dir / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
    shutil.copyfile(teacher.run_dir / TOKENS_FILE, run_dir / TOKENS_FILE)
    atomic_write_text(run_dir / "config.toml", to_toml(run_config.resolved()))

    torch.manual_seed(tc.seed)
    student = DistilledSeq2Seq(s_cfg, hard_weight=hard_weight)
    copied: list[str] = []
    usage: dict[str, list[dict[str, Any]]] | None = None
    ffn_init: list[dict[str, Any]] = []
    if init != "scratch":
        copied = copy_non_expert_weights(teacher.model, student)
        # Expert usage for the "mean" / "top" inits: the teacher on the first span-corruption examples of the
        # training split (fixed masks, as the validation examples are masked).
        usage_examples = task.examples(run_config, teacher.data, teacher.data.train_tokens)
        traces = trace_seq2seq(teacher.model, usage_examples.batches(tc.batch_size, USAGE_BATCHES))
        usage = {stack: expert_usage(trace) for stack, trace in traces.items()}
        ffn_init = init_seq2seq_student_ffns(teacher.model, student, init, usage)

    eval_data = task.eval_data(run_config, teacher.data)

    def val(model: torch.nn.Module) -> float:
        return evaluate_data(model, eval_data, tc.batch_size, tc.eval_batches)

    teacher_loss = val(teacher.model)
    student_init_loss = val(student)
    baseline_loss = val(baseline.model) if baseline is not None else None
    log(
        f"teacher {teacher.run_dir} (step {teacher.step}): validation {teacher_loss:.4f}; student after "
        f"'{init}' initialisation, before training: {student_init_loss:.4f} (nats/target token)"
    )
    student.set_teacher(teacher.model)
    batches = task.batches(run_config, teacher.data)
    batches.skip(data_offset)
    trainer = Trainer(tc, student, batches, eval_data, run_dir,
                      extra_state={"config": run_config.resolved(), "distill": {"init": init}}, log=log)
    result = trainer.fit()
    student_loss = result.final_val_loss if result.final_val_loss is not None else val(student)
    try:
        plot_run(run_dir, teacher_loss=teacher_loss, objective=distill_objective(hard_weight))
    except Exception as exc:  # a plotting failure must not lose a finished run
        log(f"plotting failed: {exc}")
    t_counts, s_counts = seq2seq_parameter_counts(t_cfg), seq2seq_parameter_counts(s_cfg)
    inputs_len, targets_len = eval_data.inputs_length, eval_data.targets_length
    t_flops = seq2seq_flops_per_token(t_cfg, inputs_len, targets_len)["forward"]
    s_flops = seq2seq_flops_per_token(s_cfg, inputs_len, targets_len)["forward"]
    info: dict[str, Any] = {
        "arch": "seq2seq",
        "loss_unit": "nats/target token",
        "teacher_run": str(teacher.run_dir),
        "teacher_checkpoint": str(teacher.checkpoint),
        "init": init,
        "hard_weight": hard_weight,
        **_data_record(teacher, tc, data_offset, batches),
        "copied_parameters": copied,
        "ffn_init": ffn_init,
        "teacher_usage": usage,
        **_outcome(result.step, teacher_loss, student_init_loss, student_loss, baseline, baseline_loss, t_counts,
                   s_counts),
        # Forward FLOPs per target token (encoder included) of one example of the run's lengths: equal but for the
        # teacher's router matmuls, which the dense student has no counterpart of.
        "teacher_forward_flops_per_target_token": t_flops,
        "student_forward_flops_per_target_token": s_flops,
        "train_seconds": result.elapsed_s,
        "tokens_per_s": result.tokens_per_s,
    }
    (run_dir / "distill.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    summary = {
        "run_dir": str(run_dir),
        "arch": "seq2seq",
        "steps": result.step,
        "final_val_loss": student_loss,
        "final_val_perplexity": float(np.exp(student_loss)),
        "distilled_from": str(teacher.run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    info["run_dir"] = str(run_dir)
    return info
