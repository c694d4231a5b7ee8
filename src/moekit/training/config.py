"""The ``[train]`` section of a run config: steps, batch, optimizer, schedule, precision, checkpoints,
policies."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import INT64_MAX, check_bool, check_choice, check_int, check_number
from moekit.errors import ConfigError

__all__ = [
    "TrainConfig", "MAX_THREADS", "OPTIMIZERS", "SCHEDULES", "PRECISIONS", "NONFINITE_POLICIES", "PROGRESS_MODES",
]

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
PRECISIONS = ("float32", "bf16")
NONFINITE_POLICIES = ("skip", "rollback", "raise")
PROGRESS_MODES = ("auto", "bar", "plain", "off")
# More intra-op threads than cores only makes them wait on each other at every kernel (see
# ``trainer.resolve_threads``); no machine this trains on has 1,024 cores, so a larger count is a typo (100000 would
# also ask the OS for that many threads).
MAX_THREADS = 1024


@dataclass
class TrainConfig:
    """Attributes:
    max_steps: optimizer steps to run (skipped steps count: they consumed a batch).
    batch_size: sequences per step.
    seed: seeds the model init, the data order and every random draw (dropout, router jitter); in [0, 2**63 - 1].
    log_every: write a metrics line every N steps.
    eval_every: validation every N steps (0: only at the end).
    eval_batches: validation batches per evaluation (None: the whole validation split).
    checkpoint_every: checkpoint every N steps (0: only at the end).
    keep_checkpoints: keep the last K checkpoints (>= 2 so a corrupted latest one has a fallback).
    optimizer: "adamw" or "adafactor".
    lr: peak learning rate.
    weight_decay: decoupled weight decay (AdamW; Adafactor multiplies it by the lr as well).
    beta1, beta2, eps: AdamW moments (beta1 is Adafactor's momentum when > 0).
    update_clip_d: Adafactor update clipping ``U / max(1, RMS(U) / d)`` (ST-MoE: d = 1).
    scale_parameter: Adafactor's step times ``max(1e-3, RMS(parameter))`` (T5's parameter scale; the learning rate
        is then a fraction of each weight's size: T5 and ST-MoE used 1e-2).
    relative_step: Adafactor's step size ``min(1e-2, 1 / sqrt(t))`` (the paper's and T5's), ignoring ``lr``,
        ``warmup_steps`` and ``schedule``.
    warmup_steps: linear warm-up from 0.
    schedule: "cosine" (to ``min_lr_ratio * lr`` at ``max_steps``), "inverse_sqrt" or "constant" after warm-up.
    min_lr_ratio: floor of the cosine decay.
    grad_clip: clip the global gradient norm to this (0: off).
    precision: "float32" or "bf16" (autocast; the router and the losses stay float32).
    nonfinite: "skip" (GLaM: skip the update of a batch with a NaN/Inf loss or gradient; after
        ``max_consecutive_skips`` in a row, roll back to the last checkpoint and go on with the next
        data),
        "rollback" (roll back at once) or "raise".
    max_consecutive_skips: see ``nonfinite``.
    threads: torch intra-op threads, at most :data:`MAX_THREADS`; 0 (auto): torch's default (one per core), fewer
            when the load average says other processes hold cores (see ``trainer.resolve_threads``). A
            process-wide setting, so the ``Trainer`` does not apply it: the command line does
            (``moekit.lab.runtime.set_threads``), a script calls ``torch.set_num_threads`` itself.
    progress: "auto" (a bar on a terminal, plain lines otherwise), "bar", "plain" or "off".
    tensorboard: also write TensorBoard events (needs the ``tensorboard`` package).
    init_from: model weights to start from, a path relative to the run directory of a file written by
        :func:`moekit.training.checkpoint.save_initial_weights` (``"init/model.safetensors"``: an upcycled or
        imported model). Loaded (verified, strictly) when training starts at step 0 with no checkpoint; the
        optimizer starts fresh. None: the model's own random init.
    """

    max_steps: int = 500
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    update_clip_d: float = 1.0
    scale_parameter: bool = False
    relative_step: bool = False
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "float32"
    nonfinite: str = "skip"
    max_consecutive_skips: int = 3
    threads: int = 0
    progress: str = "auto"
    tensorboard: bool = False
    init_from: str | None = None

    def __post_init__(self) -> None:
        check_int("train.max_steps", self.max_steps, 1)
        check_int("train.batch_size", self.batch_size, 1)
        check_int("train.seed", self.seed, 0, INT64_MAX)  # numpy and torch seeds take 64 bits
        check_int("train.log_every", self.log_every, 1)
        check_int("train.eval_every", self.eval_every, 0)
        if self.eval_batches is not None:
            check_int("train.eval_batches", self.eval_batches, 1)
        check_int("train.checkpoint_every", self.checkpoint_every, 0)
        check_int("train.keep_checkpoints", self.keep_checkpoints, 2)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_number("train.lr", self.lr, low=0.0, low_open=True)
        check_number("train.weight_decay", self.weight_decay, low=0.0)
        check_number("train.beta1", self.beta1, low=0.0, high=0.999999)
        check_number("train.beta2", self.beta2, low=0.0, high=0.999999)
        check_number("train.eps", self.eps, low=0.0, low_open=True)
        check_number("train.update_clip_d", self.update_clip_d, low=0.0, low_open=True)
        check_bool("train.scale_parameter", self.scale_parameter)
        check_bool("train.relative_step", self.relative_step)
        if (self.scale_parameter or self.relative_step) and self.optimizer != "adafactor":
            on = "scale_parameter" if self.scale_parameter else "relative_step"
            raise ConfigError(f"train.{on} = true is an Adafactor setting: it needs train.optimizer = 'adafactor', "
                              f"not {self.optimizer!r}")
        check_int("train.warmup_steps", self.warmup_steps, 0)
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_number("train.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_number("train.grad_clip", self.grad_clip, low=0.0)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_int("train.max_consecutive_skips", self.max_consecutive_skips, 1)
        check_int("train.threads", self.threads, 0, MAX_THREADS)
        check_choice("train.progress", self.progress, PROGRESS_MODES)
        check_bool("train.tensorboard", self.tensorboard)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ConfigError(f"train.init_from must be a path (relative to the run directory) or none, "
                              f"got {self.init_from!r}")
