"""One training run end to end: prepare the data (corpus -> split -> tokenizer -> token arrays), build the
model,
train, evaluate against the unigram baseline, plot, and write ``summary.json``. ``moekit train`` is a thin
wrapper.

Run directory layout::

    config.toml            the resolved config (every default filled in)
    tokenizer.json         byte-level BPE trained on the training split
    data/tokens.safetensors  train and validation token ids (a resume or eval needs no corpus)
    metrics.jsonl          one JSON object per logged step
    checkpoints/step_*/    atomic checkpoints (see checkpoint.py)
    plots/*.png            loss curves and per-layer expert load
    summary.json           final figures
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from moekit.atomic import atomic_path, atomic_write_text
from moekit.data.batches import TokenBatches, unigram_cross_entropy
from moekit.data.images import ImageBatches, ImageEvalData
from moekit.errors import MoekitError
from moekit.lab.data.corpus import load_corpus
from moekit.lab.data.images import ImageSplits, load_images
from moekit.lab.data.split import cut_pieces, split_pieces
from moekit.lab.data.tokenizer import encode_pieces, load_tokenizer, train_tokenizer
from moekit.lab.training.plots import plot_run
from moekit.lab.training.run_config import RunConfig, build_run_config, to_toml, tomllib
from moekit.models import TransformerLM, parameter_counts
from moekit.models.flops import flops_per_token
from moekit.models.vit import ViT, vit_flops_per_image, vit_parameter_counts
from moekit.training import checkpoint as ckpt
from moekit.training.trainer import Trainer

__all__ = [
    "LoadedRun",
    "PreparedData",
    "default_run_dir",
    "load_run",
    "load_trained_run",
    "prepare_data",
    "read_run_config",
    "train_run",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENS_FILE = "data/tokens.safetensors"


@dataclass
class PreparedData:
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    vocab_size: int
    tokenizer_path: Path


def prepare_data(run_config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> PreparedData:
    """Reuse the run's tokenizer and token arrays when present; otherwise build them from the corpus."""
    d = run_config.data
    tok_path = run_dir / TOKENIZER_FILE
    tokens_path = run_dir / TOKENS_FILE
    if tok_path.is_file() and tokens_path.is_file():
        tok = load_tokenizer(tok_path)
        arrays = np_load_file(str(tokens_path))
        return PreparedData(arrays["train"], arrays["val"], tok.get_vocab_size(), tok_path)
    t0 = time.perf_counter()
    docs = load_corpus(d.corpus, d.cache_dir)
    pieces = cut_pieces(docs, d.piece_chars, d.max_chars)
    train_pieces, val_pieces = split_pieces(pieces, d.val_fraction)
    tok = train_tokenizer([text for _, text, _ in train_pieces], d.vocab_size)
    train_tokens = encode_pieces(tok, train_pieces)
    val_tokens = encode_pieces(tok, val_pieces)
    n_chars = sum(len(t) for _, t, _ in pieces)
    log(
        f"corpus {d.corpus!r}: {n_chars:,} characters -> {len(train_tokens):,} training and"
        f" {len(val_tokens):,} validation tokens (vocabulary {tok.get_vocab_size()})"
        f" in {time.perf_counter() - t0:.1f}s"
    )
    # The run directory is created only now, once the corpus has loaded: bad input leaves nothing behind.
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(tokens_path) as tmp:
        np_save_file({"train": train_tokens, "val": val_tokens}, str(tmp))
    with atomic_path(tok_path) as tmp:
        tok.save(str(tmp))
    return PreparedData(train_tokens, val_tokens, tok.get_vocab_size(), tok_path)


def default_run_dir(config_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config_name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not run_dir.is_dir():
        raise MoekitError(f"run directory {str(run_dir)!r} does not exist")
    if not cfg_path.is_file():
        raise MoekitError(f"{run_dir} is not a moekit run directory (no config.toml)")
    try:
        return build_run_config(tomllib.loads(cfg_path.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as exc:
        raise MoekitError(f"{cfg_path}: not valid TOML: {exc}") from None


def load_run(run_dir: str | Path, *, allow_vit: bool = False) -> tuple[RunConfig, Any, torch.nn.Module]:
    """The config, data and (freshly initialised) model of an existing run directory: ``PreparedData`` and a
    :class:`TransformerLM` for a language-model run; with ``allow_vit``, ``ImageSplits`` and a ``ViT`` for an
    image-classifier run (refused otherwise: the caller works on language models only)."""
    run_dir = Path(run_dir)
    run_config = read_run_config(run_dir)
    if run_config.is_vit:
        if not allow_vit:
            raise MoekitError(
                f"{run_dir} is an image classifier (model.arch = 'vit') run; this command works on language-model "
                "runs (moekit eval works on both)"
            )
        splits = prepare_images(run_config)
        torch.manual_seed(run_config.train.seed)
        return run_config, splits, ViT(run_config.vit_config())
    data = prepare_data(run_config, run_dir, lambda msg: None)
    torch.manual_seed(run_config.train.seed)
    model = TransformerLM(run_config.lm_config(data.vocab_size))
    return run_config, data, model


# Loading a trained run for eval, generate, analyze and distill. By default a newest checkpoint that fails its
# checksum is an error (an analysis of a silently older model would mislead); with ``fallback=True`` the newest
# checkpoint that passes is used and ``warn`` is told about each one skipped.
@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    data: Any  # PreparedData (language model) or ImageSplits (ViT)
    model: torch.nn.Module  # TransformerLM or ViT
    checkpoint: Path
    step: int


def load_trained_run(
    run_dir: str | Path,
    *,
    fallback: bool = False,
    warn: Callable[[str], None] | None = None,
    allow_vit: bool = False,
) -> LoadedRun:
    """The run in ``run_dir`` with the weights of its newest checkpoint (in eval mode); ``allow_vit`` as in
    :func:`load_run`."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MoekitError(f"run directory {str(run_dir)!r} does not exist")
    run_config, data, model = load_run(run_dir, allow_vit=allow_vit)
    root = run_dir / "checkpoints"
    found_list = ckpt.list_checkpoints(root)
    if not found_list:
        raise MoekitError(f"{run_dir} has no checkpoint (checkpoints/step_* is missing): was it trained?")
    if fallback:
        found = ckpt.latest_valid_checkpoint(root, report=warn)
        if found is None:
            raise MoekitError(f"no checkpoint in {root} passes its checksum")
        path, blobs = found
    else:
        path = found_list[0]
        try:
            blobs = ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as exc:
            raise MoekitError(f"{exc} (use --fallback to take the newest checkpoint that passes)") from None
    state = ckpt.load_checkpoint(blobs, model)
    model.eval()
    return LoadedRun(run_dir, run_config, data, model, path, int(state["step"]))


def train_run(
    run_config: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns the summary also written to ``summary.json``.

    On resume the run's saved config is used; ``run_config`` (may be None) only supplies a new ``[train]``
    (and ``[parallel]``) section (e.g. a larger ``max_steps``): the model and data must stay what was trained.
    Under expert parallelism (``parallel.expert_parallel > 1``, one call per rank) a collective that fails or
    times out (a rank died or hangs) is raised as a one-line :class:`MoekitError`.
    """
    try:
        return _train_run(run_config, run_dir, resume=resume, log=log)
    except RuntimeError as exc:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if isinstance(exc, MoekitError) or not distributed:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        timeout = run_config.parallel.timeout_s if run_config is not None else "the saved value"
        raise MoekitError(
            f"expert-parallel rank {torch.distributed.get_rank()}: a collective failed ({first}); another rank "
            f"probably died or hangs (parallel.timeout_s = {timeout})"
        ) from None


def _train_run(
    run_config: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    if resume:
        loaded_config = read_run_config(run_dir)
        if run_config is not None:
            loaded_config.train = run_config.train
            loaded_config.parallel = run_config.parallel
        else:  # the expert-parallel degree is the launch's, not the saved run's: checkpoints reshard
            from moekit.training.distributed import launch_world_size

            loaded_config.parallel = dataclasses.replace(loaded_config.parallel, expert_parallel=launch_world_size())
            loaded_config.__post_init__()
        run_config = loaded_config
    elif run_config is None:
        raise ValueError("train_run needs a run_config for a new run")
    elif (run_dir / "config.toml").exists():
        raise MoekitError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    from moekit.training.distributed import ExpertParallel, init_expert_parallel

    distributed = init_expert_parallel(run_config.parallel.expert_parallel, run_config.parallel.timeout_s)
    is_main = not distributed or torch.distributed.get_rank() == 0
    if not is_main:  # only rank 0 writes files and user-facing lines
        log = lambda msg: None  # noqa: E731
    # The thread count is the process's: the caller applies train.threads (moekit train and compare do, with
    # moekit.lab.runtime.set_threads); a library function does not change a process-wide setting.
    threads = torch.get_num_threads()
    if run_config.is_vit:
        task = _image_task(run_config, log)
    else:
        task = _lm_task(run_config, run_dir, log, distributed=distributed, is_main=is_main)
    if not resume:
        log(f"run directory: {run_dir}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(run_config.resolved()))
    torch.manual_seed(run_config.train.seed)
    model = task.build_model()
    trainer = Trainer(
        run_config.train,
        model,
        task.batches,
        task.val_data,
        run_dir,
        extra_state={"config": run_config.resolved()},
        log=log,
        parallel=ExpertParallel(model) if distributed else None,
    )
    if resume:
        trainer.resume()
    if trainer.step == 0:
        log(
            f"model: {task.counts['total']:,} parameters, {task.counts['active']:,} active per "
            f"token, {task.train_flops / 1e6:.1f} MFLOP per training {task.unit}; "
            f"{run_config.train.max_steps} steps of {task.batch_text}, {threads} thread(s)"
        )
    result = trainer.fit()
    if not is_main:
        return {
            "run_dir": str(run_dir),
            "steps": result.step,
            "final_val_loss": result.final_val_loss,
            "is_main": False,
        }
    baseline = task.baseline()
    try:
        plots = [str(p) for p in plot_run(run_dir, baseline.get("unigram_val_loss"))]
    except Exception as exc:  # a plotting failure must not lose a finished run
        log(f"plotting failed: {exc}")
        plots = []
    summary = {
        "run_dir": str(run_dir),
        "arch": run_config.arch,
        "steps": result.step,
        "final_val_loss": result.final_val_loss,
    }
    if run_config.is_vit:
        summary["final_val_accuracy"] = result.final_val_accuracy
    else:
        summary["final_val_perplexity"] = (
            float(np.exp(result.final_val_loss)) if result.final_val_loss is not None else None
        )
    summary.update(baseline)
    summary.update(
        {
            "skipped_steps": result.skipped_steps,
            "rollbacks": result.rollbacks,
            "train_seconds_this_session": result.elapsed_s,
            "wall_seconds_this_session": time.perf_counter() - t0,
            "train_time_s": result.train_time_s,
            # For an image classifier a "token" is one image (the unit the trainer counts).
            "tokens_per_s": result.tokens_per_s,
            "parameters_total": task.counts["total"],
            "parameters_active": task.counts["active"],
            "train_flops_per_token": task.train_flops_per_token,
            "plots": plots,
        }
    )
    if run_config.is_vit:
        summary["train_flops_per_image"] = task.train_flops
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


@dataclass
class _Task:
    """What differs between a language-model run and an image-classifier run."""

    build_model: Callable[[], torch.nn.Module]
    batches: Any
    val_data: Any
    counts: dict[str, int]
    train_flops: float  # per training example: a token (LM) or an image (ViT)
    train_flops_per_token: float
    unit: str
    batch_text: str
    baseline: Callable[[], dict[str, float]]


def _lm_task(
    run_config: RunConfig, run_dir: Path, log: Callable[[str], None], *, distributed: bool, is_main: bool
) -> _Task:
    if distributed:
        # Rank 0 builds the tokenizer and token arrays; the others then read them (no two writers of one file).
        if is_main:
            data = prepare_data(run_config, run_dir, log)
        torch.distributed.barrier()
        if not is_main:
            data = prepare_data(run_config, run_dir, log)
    else:
        data = prepare_data(run_config, run_dir, log)
    lm_config = run_config.lm_config(data.vocab_size)
    train = run_config.train
    seq_len = run_config.data.seq_len
    flops = flops_per_token(lm_config, seq_len)

    def baseline() -> dict[str, float]:
        max_windows = None if train.eval_batches is None else train.eval_batches * train.batch_size
        unigram = unigram_cross_entropy(data.train_tokens, data.val_tokens, data.vocab_size, seq_len, max_windows)
        return {"unigram_val_loss": unigram}

    return _Task(
        build_model=lambda: TransformerLM(lm_config),
        batches=TokenBatches(data.train_tokens, train.batch_size, seq_len, train.seed),
        val_data=data.val_tokens,
        counts=parameter_counts(lm_config),
        train_flops=flops["train"],
        train_flops_per_token=flops["train"],
        unit="token",
        batch_text=f"{train.batch_size} x {seq_len} tokens",
        baseline=baseline,
    )


def prepare_images(run_config: RunConfig) -> ImageSplits:
    """The image set of a ViT run (``ImageSplits``), cut to ``data.train_examples`` / ``data.test_examples``,
    checked against the model's image size, channels and classes."""
    d = run_config.data
    splits = load_images(d.dataset)
    if d.train_examples is not None:
        splits.train_images = splits.train_images[: d.train_examples]
        splits.train_labels = splits.train_labels[: d.train_examples]
    if d.test_examples is not None:
        splits.test_images = splits.test_images[: d.test_examples]
        splits.test_labels = splits.test_labels[: d.test_examples]
    vit = run_config.vit_config()
    _, channels, height, width = tuple(splits.train_images.shape)
    if (height, width) != (vit.image_size, vit.image_size) or channels != vit.in_channels:
        raise MoekitError(
            f"data.dataset {d.dataset!r} holds {channels}-channel {height}x{width} images but the model expects "
            f"{vit.in_channels}-channel {vit.image_size}x{vit.image_size}: set model.image_size / model.in_channels"
        )
    top = int(max(int(splits.train_labels.max()), int(splits.test_labels.max())))
    if top >= vit.num_classes:
        raise MoekitError(
            f"data.dataset {d.dataset!r} has labels up to {top} but model.num_classes = {vit.num_classes}"
        )
    return splits


def _image_task(run_config: RunConfig, log: Callable[[str], None]) -> _Task:
    splits = prepare_images(run_config)
    vit = run_config.vit_config()
    train = run_config.train
    log(
        f"data: {run_config.data.dataset}: {len(splits.train_labels):,} training and {len(splits.test_labels):,} "
        f"test images"
    )
    flops = vit_flops_per_image(vit)

    def baseline() -> dict[str, float]:
        # The accuracy of always answering the commonest training class: what a model that ignores the pixels gets.
        labels = np.asarray(splits.train_labels)
        common = int(np.bincount(labels, minlength=vit.num_classes).argmax())
        return {"majority_val_accuracy": float((np.asarray(splits.test_labels) == common).mean())}

    return _Task(
        build_model=lambda: ViT(vit),
        batches=ImageBatches(splits.train_images, splits.train_labels, train.batch_size, train.seed),
        val_data=ImageEvalData(splits.test_images, splits.test_labels),
        counts=vit_parameter_counts(vit),
        train_flops=flops["train"],
        train_flops_per_token=flops["train"] / vit.num_tokens,
        unit="image",
        batch_text=f"{train.batch_size} images of {vit.num_tokens} tokens",
        baseline=baseline,
    )
