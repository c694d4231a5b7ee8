"""The training loop: schedule, clipping, precision, non-finite policy, metrics, evaluation and checkpoints.

A resumed run continues bit-exactly on CPU: the checkpoint holds the weights, every optimizer tensor, the torch RNG
state, the data position, the counters of the non-finite policy and the metrics log length, and the learning rate
is a pure function of the step. So a run killed with SIGKILL at any moment and resumed logs the same per-step losses
as one that was never interrupted.

Checkpoint formats: one process writes the single-file format (:mod:`moekit.training.checkpoint`); under
``parallel`` every rank writes the chunks it holds (:mod:`moekit.training.sharded_checkpoint`), with nothing gathered
on rank 0. Resume and roll-back read either format at any layout: a sharded checkpoint of another ``(dp, ep)`` or
of one process, a single-file checkpoint under a mesh.

A caller that wants to stop a run cleanly (the command line on SIGTERM / SIGINT) calls :meth:`Trainer.request_stop`,
which only sets a flag: ``fit`` finishes the step in progress, writes a checkpoint at that step and returns with
``TrainResult.stopped``. The trainer installs no signal handler itself (the core has no process-wide side effects).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from moekit.data.batches import TokenBatches, TokenEvalData
from moekit.errors import MoekitError
from moekit.layers.expert_parallel import is_expert_parallel
from moekit.routing.balance import balancing_routers, reset_expert_load, update_expert_bias
from moekit.training import checkpoint as ckpt
from moekit.training.config import TrainConfig
from moekit.training.distributed import ExpertParallel
from moekit.training.metrics import MetricsLog, Progress, load_cv, max_violation
from moekit.training.optim import build_optimizer
from moekit.training.schedule import lr_at
from moekit.training.sharded_checkpoint import save_sharded

__all__ = ["Trainer", "TrainResult", "EvalData", "BatchSource", "resolve_threads"]


class BatchSource(Protocol):
    """Endless training batches with a resumable position (``TokenBatches``, ``ImageBatches``)."""

    batch_size: int

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class EvalData(Protocol):
    """Fixed held-out batches ``(inputs, targets)`` in order (``TokenEvalData``, ``ImageEvalData``)."""

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

# A run that keeps diverging after this many roll-backs is stopped instead of looping forever.
MAX_ROLLBACKS = 10


def resolve_threads(requested: int) -> int:
    """``requested`` when > 0; for 0 (auto), torch's default (one per core) unless the machine is busy: then the
    cores the 1-minute load average leaves free, at least 1.

    Why: on a shared machine, threads that wait on each other at every kernel's barrier while other processes hold
    the cores run far slower than one thread (measured here: 2 threads ~1,400 tokens/s vs 1 thread ~3,500 on 2
    busy cores). The thread count does not change the numbers (the per-step losses are the same with 1 and 2
    threads), so a resumed run stays exact whatever each session picks.
    """
    if requested > 0:
        return requested
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return default
    cores = os.cpu_count() or default
    return max(1, min(default, cores - int(round(load))))


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns. ``tokens_per_s`` counts the time of training steps only (this session);
    ``elapsed_s`` is the wall time of the whole ``fit`` call, evaluations and checkpoints included;
    ``train_time_s`` the seconds spent in training steps since the run began (all sessions). For an image
    classifier a "token" is one image, and ``final_val_accuracy`` is the held-out accuracy (None for an LM)."""

    step: int
    final_val_loss: float | None
    skipped_steps: int
    rollbacks: int
    elapsed_s: float
    tokens_per_s: float
    train_time_s: float = 0.0
    final_val_accuracy: float | None = None
    # Set when fit stopped early on request (Trainer.request_stop): the checkpoint written at the step it stopped.
    stopped_at: Path | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None


class Trainer:
    """Trains a :class:`~moekit.models.TransformerLM`, a :class:`~moekit.models.ViT`, or any model whose
    ``forward(inputs, targets)`` returns an object with ``loss``, ``ce_loss``, ``load_balancing_loss``, ``z_loss``
    and ``aux`` (and, for a classifier, ``correct``: the number of right predictions, which adds
    ``val_accuracy`` to the metrics).

    Args:
        config: the ``[train]`` section.
        model: the model, already initialised (seeded by the caller).
        train_batches: resumable training batches (:class:`BatchSource`).
        val_tokens: held-out data: a token-id array (windows of the training batches' ``seq_len``) or any
            :class:`EvalData`; None: no validation.
        run_dir: where ``metrics.jsonl`` and ``checkpoints/`` go.
        extra_state: JSON-able values saved in every checkpoint (e.g. the run config).
        log: where user-facing messages go (one line each).
        parallel: data x expert parallelism (``moekit.training.distributed``): the model is built with every
            expert and trains with this rank's experts only; every rank writes its own shards of each checkpoint.
            None for one process.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        train_batches: BatchSource,
        val_tokens: np.ndarray | EvalData | None,
        run_dir: str | Path,
        *,
        extra_state: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        parallel: ExpertParallel | None = None,
    ) -> None:
        self.config = config
        self.parallel = parallel
        # Only rank 0 writes files (metrics, checkpoints, TensorBoard) and user-facing lines.
        self.is_main = parallel is None or parallel.is_main
        self.model = model
        self.batches = train_batches
        if isinstance(val_tokens, np.ndarray):
            if not isinstance(train_batches, TokenBatches):
                raise ValueError("a token array for validation needs TokenBatches for training (its seq_len)")
            # Found now rather than at the first evaluation, after minutes of training.
            val_tokens = TokenEvalData(val_tokens, train_batches.seq_len)
        self.val_data: EvalData | None = val_tokens
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.extra_state = extra_state or {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not self.is_main:
            self.log = lambda msg: None
        self.optimizer = build_optimizer(model, config)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.tokens_seen = 0
        self.last_val_loss: float | None = None
        self.last_val_accuracy: float | None = None
        self.train_time_s = 0.0  # seconds in training steps since the run began (saved in checkpoints)
        self._metrics_bytes: int | None = None  # log length at the loaded checkpoint
        self._tb = None
        self._val_step: int | None = None  # the step last_val_loss was computed at (this session)
        # The step whose complete state (data position and RNG included) is in a checkpoint; None when unknown.
        self._saved_step: int | None = None
        self._stop_requested = False
        # Under parallelism, whether any rank had asked to stop by the last step's loss all-reduce (which carries
        # the flag): every rank reads the same value, so all stop after the same step.
        self._stop_agreed = False

    def request_stop(self) -> None:
        """Ask :meth:`fit` to stop at the next step boundary: the step in progress finishes, a checkpoint of that
        step is written (unless it has one already) and ``fit`` returns a result whose ``stopped_at`` names it.
        Only sets a flag, so a signal handler may call it. Under expert parallelism a request on any rank stops
        every rank at the same step."""
        self._stop_requested = True

    # -----------------------------------------------------------------------------------------------------
    # state
    def _state(self, metrics_bytes: int) -> dict[str, Any]:
        return {
            **self.extra_state,
            "data": self.batches.state_dict(),
            "rng": ckpt.rng_state(),
            # Every rank's RNG stream, in rank order (one entry without expert parallelism).
            "rng_per_rank": self.parallel.gather(ckpt.rng_state()) if self.parallel else [ckpt.rng_state()],
            "skipped_steps": self.skipped_steps,
            # The streak of skipped steps so far: without it a resume inside a streak rolled back later than the
            # uninterrupted run (a checkpoint written before it existed has none: 0).
            "consecutive_skips": self.consecutive_skips,
            "rollbacks": self.rollbacks,
            "tokens_seen": self.tokens_seen,
            "last_val_loss": self.last_val_loss,
            "last_val_accuracy": self.last_val_accuracy,
            "train_time_s": self.train_time_s,
            "metrics_bytes": metrics_bytes,
        }

    def _unhealthy(self) -> str | None:
        """Why a checkpoint of the current state would not be one to roll back to, as far as the trainer knows
        (the checkpoint adds non-finite weights): a validation loss computed at this step that is not finite."""
        v = self.last_val_loss
        if self._val_step == self.step and v is not None and not math.isfinite(v):
            return f"validation loss {v} at step {self.step}"
        return None

    def save(self, metrics: MetricsLog | None) -> Path:
        # Durable before the checkpoint that records its length: a crash then never finds the log shorter.
        try:
            size = metrics.flush(sync=True) if metrics is not None else 0
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ckpt.CheckpointSpaceError(
                f"cannot write {self.run_dir / 'metrics.jsonl'} before checkpoint step {self.step}: no space left on "
                "the device; the earlier checkpoints are intact (free some space, then resume)"
            ) from None
        self._saved_step = None  # until the write below succeeds
        if self.parallel is None:
            path = ckpt.save_checkpoint(
                self.ckpt_dir, self.step, self.model, self.optimizer, self._state(size), self.config.keep_checkpoints,
                unhealthy=self._unhealthy(),
            )
            self._saved_step = self.step
            return path
        # Every rank writes the chunks it holds (its experts, its share of the replicated tensors) with DCP: nothing
        # is gathered, so a checkpoint needs no more memory than training. The state is rank 0's (data position,
        # counters) with every rank's RNG stream; the metrics log length is rank 0's, the only one that writes it.
        path = save_sharded(
            self.ckpt_dir, self.step, self.model, self.optimizer, self.parallel,
            self._state(self.parallel.broadcast(size)), keep=self.config.keep_checkpoints,
            unhealthy=self._unhealthy(),
        )
        self._saved_step = self.step
        return path

    def _load(self, data: ckpt.VerifiedCheckpoint) -> dict[str, Any]:
        """Load a verified checkpoint of either format into the model and optimizer as they run here."""
        if self.parallel is None:
            return ckpt.load_checkpoint(data, self.model, self.optimizer)
        if data.sharded:
            # Slice the experts first (a no-op once they are): each rank then reads only the chunks it holds,
            # whatever layout the checkpoint was saved at.
            self._shard()
            return ckpt.load_checkpoint(data, self.model, self.optimizer, parallel=self.parallel)
        # A single-file checkpoint (saved by one process, or by an older moekit under expert parallelism) holds the
        # single-process layout: gather the experts, load, and slice them again where they were sliced.
        sliced = is_expert_parallel(self.model)
        self.parallel.unshard(self.optimizer)
        # (FSDP's shards, when already cut, take their part of each full tensor.)
        state = ckpt.load_checkpoint(data, self.model, self.optimizer, parallel=self.parallel)
        if sliced:
            self._shard()
        return state

    @contextlib.contextmanager
    def _fsdp_quiet(self) -> Iterator[None]:
        """Around a training forward under FSDP: FSDP2 warns, at every call, of each output tensor that is a view
        (an in-place op on it would skip its backward hook); the routing statistics in ``MoEAux`` are such views and
        nothing writes to them in place, so the warning says nothing here."""
        if self.parallel is None or not self.parallel.fsdp_applied:
            yield
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            yield

    def _shard(self) -> None:
        """Lay the model out for the parallel run (experts sliced, FSDP's shards cut: each once); FSDP replaces
        parameters, so the list the step clips is taken again."""
        self.parallel.shard(self.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _checkpoints(self) -> list[Path]:
        """The checkpoints, newest first: rank 0's listing on every rank, so that all walk the same list."""
        found = ckpt.list_checkpoints(self.ckpt_dir)
        return found if self.parallel is None else self.parallel.broadcast(found)

    def resume(self) -> bool:
        """Load the newest checkpoint that verifies (reporting any that do not). False when there is none."""
        # Rank 0 only (it alone writes checkpoints); the listing below is broadcast after it.
        removed = ckpt.clean_partial(self.ckpt_dir) if self.is_main else []
        for p in removed:
            self.log(f"removed a partial checkpoint left by an interrupted write: {p}")
        found = ckpt.latest_valid_checkpoint(self.ckpt_dir, report=self.log, parallel=self.parallel)
        if found is None:
            if ckpt.list_checkpoints(self.ckpt_dir):
                raise MoekitError(f"no checkpoint in {self.ckpt_dir} passes its checksum; cannot resume")
            return False
        path, data = found
        state = self._load(data)
        self._apply_state(state, restore_data=True)
        self._saved_step = self.step
        self.log(f"resumed from {path} (step {self.step})")
        return True

    def _apply_state(self, state: dict[str, Any], *, restore_data: bool) -> None:
        self.step = int(state["step"])
        if restore_data:
            self.batches.load_state_dict(state["data"])
            # This rank's own stream when the checkpoint has one (a run saved with as many ranks or more),
            # else the main stream.
            per_rank = state.get("rng_per_rank") or [state["rng"]]
            rank = self.parallel.rank if self.parallel else 0
            ckpt.set_rng_state(per_rank[rank] if rank < len(per_rank) else state["rng"])
            self.skipped_steps = int(state["skipped_steps"])
            self.consecutive_skips = int(state.get("consecutive_skips", 0))
            self.rollbacks = int(state["rollbacks"])
            self.tokens_seen = int(state["tokens_seen"])
            self._metrics_bytes = int(state["metrics_bytes"])
            self.train_time_s = float(state.get("train_time_s", 0.0))
        self.last_val_loss = state.get("last_val_loss")
        self.last_val_accuracy = state.get("last_val_accuracy")
        self._val_step = None

    def _rollback_target(self, reason: str) -> tuple[Path, ckpt.VerifiedCheckpoint]:
        """The newest checkpoint that verifies and is healthy (finite weights, and a finite validation loss where
        one was computed at its step); each one passed over is logged. A checkpoint whose weights are already
        non-finite would only fail again at once, until MAX_ROLLBACKS, while an older good one is there."""
        unhealthy = 0
        for path in self._checkpoints():
            try:
                data = ckpt.verify_checkpoint(path, self.parallel)
            except ckpt.CheckpointError as exc:
                self.log(f"{exc}; trying the previous checkpoint")
                continue
            why = ckpt.unhealthy_reason(path, data)
            if why is None:
                return path, data
            unhealthy += 1
            self.log(f"not rolling back to {path}: it is unhealthy ({why}); trying the previous checkpoint")
        if unhealthy:
            raise MoekitError(
                f"{reason} at step {self.step}, and no checkpoint in {self.ckpt_dir} is healthy to roll back to "
                f"({unhealthy} unhealthy: non-finite weights or validation loss); lower train.lr or check the data"
            )
        raise MoekitError(f"{reason} and there is no checkpoint to roll back to")

    def _rollback(self, reason: str) -> None:
        """Restore weights and optimizer from the newest healthy checkpoint; keep the data position (go on with the
        next data, as GLaM) and the RNG stream."""
        self.rollbacks += 1
        if self.rollbacks > MAX_ROLLBACKS:
            raise MoekitError(
                f"training rolled back {MAX_ROLLBACKS} times and still produces non-finite values; "
                "lower train.lr or check the data"
            )
        path, data = self._rollback_target(reason)
        skipped, rollbacks, tokens = self.skipped_steps, self.rollbacks, self.tokens_seen
        state = self._load(data)
        bad_step = self.step
        self._apply_state(state, restore_data=False)
        self.skipped_steps, self.rollbacks, self.tokens_seen = skipped, rollbacks, tokens
        self.consecutive_skips = 0
        self._saved_step = None  # the weights are the checkpoint's, the data position and RNG are not
        self.log(
            f"{reason} at step {bad_step}: rolled back to {path.name} (step {self.step}), going on with the "
            "next data"
        )

    # ----------------------------------------------------------------------------------------------------
    # eval
    def _autocast(self):
        if self.config.precision == "bf16":
            device = self.params[0].device.type if self.params else "cpu"
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy (nats per token, or per image) over the fixed validation batches. For a
        model whose output has ``correct`` the accuracy is kept in ``last_val_accuracy``."""
        if self.val_data is None:
            raise MoekitError("no validation data")
        was_training = self.model.training
        self.model.eval()
        total, count, right = 0.0, 0, 0
        has_correct = False
        try:
            windows = list(self.val_data.batches(self.config.batch_size, self.config.eval_batches))
            self._first_window = (windows[0][0][:1], windows[0][1][:1], 0)
            for inputs, targets in windows:
                n_rows = None
                if self.parallel is not None:
                    inputs, targets = self.parallel.local_rows(inputs), self.parallel.local_rows(targets)
                    if inputs.shape[0] == 0:
                        # A last batch with fewer windows than ranks: this rank still runs a forward (every rank
                        # takes part in every exchange) on a window it does not count.
                        inputs, targets, n_rows = self._first_window
                with self._autocast():
                    out = self.model(inputs, targets)
                n = targets.numel() if n_rows is None else 0
                total += float(out.ce_loss) * n
                count += n
                correct = getattr(out, "correct", None)
                if correct is not None:
                    has_correct = True
                    right += int(correct) if n_rows is None else 0
        finally:
            self.model.train(was_training)
        if self.parallel is not None:
            total, count, right = self.parallel.sum([total, count, right])
        self.last_val_accuracy = right / count if has_correct else None
        return total / count

    # ----------------------------------------------------------------------------------------------------
    # train
    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, Any], bool]:
        c = self.config
        lr = lr_at(
            self.step,
            lr=c.lr,
            warmup_steps=c.warmup_steps,
            max_steps=c.max_steps,
            schedule=c.schedule,
            min_lr_ratio=c.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        par = self.parallel
        if par is not None:
            inputs, targets = par.local_rows(inputs), par.local_rows(targets)
        with self._autocast(), self._fsdp_quiet():
            out = self.model(inputs, targets)
        loss = out.loss
        values = [float(loss.detach()), float(out.ce_loss.detach()), float(out.load_balancing_loss.detach()),
                  float(out.z_loss.detach())]
        if par is not None:
            # The global mean (every rank holds the same number of tokens), with the stop flag riding along: its
            # mean is above 0 when any rank asked to stop, at no extra collective per step.
            values = par.mean([*values, 1.0 if self._stop_requested else 0.0])
            self._stop_agreed = values.pop() > 0
        finite = math.isfinite(values[0])  # the same decision on every rank
        grad_norm = float("nan")
        if finite:
            bound = c.grad_clip if c.grad_clip > 0 else math.inf
            if par is None:
                loss.backward()
                # clip_grad_norm_ with an infinite bound only measures (it multiplies by exactly 1.0).
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, bound))
            else:
                (loss / par.world).backward()  # this rank's share of the global mean
                par.sync_gradients(self.params)
                grad_norm = par.clip_gradients(self.params, bound)
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            # Loss-free balancing: nudge the routers' biases by this step's global loads (all ranks alike).
            update_expert_bias(self.model, par.group if par is not None else None)
        else:
            reset_expert_load(self.model)  # a skipped step moves no weight and no bias
        # Keep the gradient buffers (set_to_none=False): refilling mapped memory is much cheaper than fresh pages.
        self.optimizer.zero_grad(set_to_none=False)
        record: dict[str, Any] = {
            "loss": values[0],
            "ce_loss": values[1],
            "lb_loss": values[2],
            "z_loss": values[3],
            "grad_norm": grad_norm,
            "lr": lr,
        }
        if out.aux:
            metrics = [a.metrics() for a in out.aux]
            drops = [m["drop_fraction"] for m in metrics]
            entropies = [m["router_entropy"] for m in metrics]
            max_logit = max(m["max_logit"] for m in metrics)
            counts = [m["tokens_per_expert"] for m in metrics]
            routed = [m["routed_per_expert"] for m in metrics]
            # The mean gate of each layer that has gates (Soft MoE has none), weighted by its kept assignments so
            # that the ranks' means combine into the batch's: sum(gate x kept) / sum(kept).
            gated = [i for i, m in enumerate(metrics) if "mean_gate" in m]
            kept = [float(sum(counts[i])) for i in gated]
            gate_sums = [metrics[i]["mean_gate"] * k for i, k in zip(gated, kept, strict=True)]
            if par is not None:
                # Each rank routed its own rows: the batch's figures are the sums of the counts (every rank plans
                # over all E experts), the means of the fractions (equal token counts per rank) and the max logit.
                # One all-reduce for the sums and one for the max.
                L, E, G = len(counts), len(counts[0]), len(gated)
                flat = [c for row in counts for c in row] + [c for row in routed for c in row]
                summed = par.sum(drops + entropies + gate_sums + kept + flat)
                drops = [v / par.world for v in summed[:L]]
                entropies = [v / par.world for v in summed[L : 2 * L]]
                gate_sums, kept = summed[2 * L : 2 * L + G], summed[2 * L + G : 2 * L + 2 * G]
                at = 2 * L + 2 * G
                counts = [[int(round(c)) for c in summed[at + i * E : at + (i + 1) * E]] for i in range(L)]
                at += L * E
                routed = [[int(round(c)) for c in summed[at + i * E : at + (i + 1) * E]] for i in range(L)]
                max_logit = par.max([max_logit])[0]
            record["drop_fraction"] = float(np.mean(drops))
            record["drop_fraction_per_layer"] = drops
            record["router_entropy"] = float(np.mean(entropies))
            if gated:
                # Mean over the gated layers of each layer's mean gate over its kept assignments (MoEAux.mean_gate;
                # with top-1 and Switch's raw softmax gate, the mean top-1 router probability).
                per_layer = [g / k if k > 0 else 0.0 for g, k in zip(gate_sums, kept, strict=True)]
                record["mean_gate"] = float(np.mean(per_layer))
            record["max_router_logit"] = max_logit
            record["tokens_per_expert"] = counts
            record["routed_per_expert"] = routed
            # Imbalance per layer of the router's own loads (before capacity, which caps kept loads at C): max load
            # / mean load (the "max violation" of the loss-free balancing paper, 1 is perfect balance) and the
            # coefficient of variation.
            record["max_violation_per_layer"] = [max_violation(row) for row in routed]
            record["load_cv_per_layer"] = [load_cv(row) for row in routed]
            biased = balancing_routers(self.model)
            if biased:
                record["expert_bias_range_per_layer"] = [
                    float(r.expert_bias.max() - r.expert_bias.min()) for r in biased
                ]
        return record, finite

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` (continuing from ``self.step``), evaluating and checkpointing on the way."""
        c = self.config
        # A fresh start empties a log left by a process killed before its first checkpoint; a resume cuts
        # the log back to its length at the checkpoint.
        truncate = 0 if self.step == 0 else self._metrics_bytes
        metrics = (
            MetricsLog(self.run_dir / "metrics.jsonl", truncate_to=truncate, at_step=self.step, report=self.log)
            if self.is_main
            else _NullLog()
        )
        if c.tensorboard and self._tb is None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MoekitError("train.tensorboard = true needs the 'tensorboard' package") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        progress = Progress(c.max_steps, c.progress if self.is_main else "off", start_step=self.step)
        self.model.train()
        fresh = self.step == 0 and not ckpt.list_checkpoints(self.ckpt_dir)
        if self.parallel is not None:
            fresh = self.parallel.broadcast(fresh)  # rank 0's view: the others may already see its step 0
        if fresh and c.init_from is not None:
            # Given starting weights (upcycled, imported): loaded before the experts are sharded, on every rank,
            # so each rank then slices the same full banks. The optimizer's state is still empty: it starts fresh.
            ckpt.load_initial_weights(self.run_dir / c.init_from, self.model)
            self.log(f"starting from the weights in {self.run_dir / c.init_from}")
        if self.parallel is not None:
            self._shard()
        if fresh:
            self.save(metrics)  # step 0: something to roll back to from the very first step
        t_start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        # tokens/s counts training steps only (not evaluation or checkpoint writes)
        step_time_window, tokens_window, step_time_total = 0.0, 0, 0.0
        stopped_at: Path | None = None
        try:
            while self.step < c.max_steps:
                if self._stop_now():
                    # The state between two steps is exactly what a checkpoint holds, so a resume from this one
                    # continues as if the run had never stopped.
                    stopped_at = self.ckpt_dir / f"step_{self.step:08d}"
                    if self._saved_step != self.step:
                        stopped_at = self.save(metrics)
                    break
                t_step = time.perf_counter()
                inputs, targets = self.batches.next_batch()
                record, ok = self._train_step(inputs, targets)
                dt = time.perf_counter() - t_step
                step_time_window += dt
                step_time_total += dt
                self.train_time_s += dt
                self.step += 1
                n_tok = targets.numel()  # tokens for an LM (targets = inputs shifted), images for a classifier
                self.tokens_seen += n_tok
                tokens_window += n_tok
                if ok:
                    self.consecutive_skips = 0
                else:
                    self.skipped_steps += 1
                    self.consecutive_skips += 1
                record = {
                    "step": self.step,
                    **record,
                    "skipped_steps": self.skipped_steps,
                    "time_s": round(self.train_time_s, 4),
                }
                rolled = False
                if not ok:
                    loss_v, norm_v = record["loss"], record["grad_norm"]
                    reason = f"non-finite loss or gradient (loss {loss_v}, grad norm {norm_v})"
                    if c.nonfinite == "raise":
                        metrics.write(record)
                        raise MoekitError(f"{reason} at step {self.step} (train.nonfinite = 'raise')")
                    if c.nonfinite == "rollback" or self.consecutive_skips >= c.max_consecutive_skips:
                        metrics.write(record)
                        self._rollback(reason)
                        metrics.write(
                            {"step": self.step, "event": "rollback", "skipped_steps": self.skipped_steps}
                        )
                        rolled = True
                    else:
                        self.log(
                            f"step {self.step}: {reason}; update skipped ({self.consecutive_skips} in a row)"
                        )
                if rolled:
                    continue
                evaluate = self.val_data is not None and (
                    (c.eval_every > 0 and self.step % c.eval_every == 0) or self.step == c.max_steps
                )
                if evaluate:
                    self.last_val_loss = self.evaluate()
                    self._val_step = self.step
                    record["val_loss"] = self.last_val_loss
                    if self.last_val_accuracy is not None:
                        record["val_accuracy"] = self.last_val_accuracy
                if self.step % c.log_every == 0 or evaluate or not ok or self.step == c.max_steps:
                    record["tokens_per_s"] = tokens_window / max(1e-9, step_time_window)
                    step_time_window, tokens_window = 0.0, 0
                    metrics.write(record)
                    self._tensorboard(record)
                    text = f"loss {record['loss']:.3f}"
                    if "val_loss" in record:
                        text += f" val {record['val_loss']:.3f}"
                    # tokens_per_s counts the targets: tokens for a language model, images for a classifier.
                    unit = getattr(self.batches, "unit", "tok")
                    progress.update(self.step, text + f" {record['tokens_per_s']:.0f} {unit}/s")
                if (
                    c.checkpoint_every > 0 and self.step % c.checkpoint_every == 0
                ) or self.step == c.max_steps:
                    self.save(metrics)
        finally:
            # With an error in flight, that error is the one to report: flushing the log may fail the same way
            # (a full disk) and must not replace it.
            in_flight = sys.exc_info()[1] is not None
            for finish in (metrics.flush, metrics.close):
                try:
                    finish()
                except OSError:
                    if not in_flight:
                        raise
            progress.close()
            if self._tb is not None:
                self._tb.flush()
        elapsed = time.perf_counter() - t_start
        return TrainResult(
            step=self.step,
            final_val_loss=self.last_val_loss,
            skipped_steps=self.skipped_steps,
            rollbacks=self.rollbacks,
            elapsed_s=elapsed,
            tokens_per_s=(self.tokens_seen - tokens_at_start) / max(1e-9, step_time_total),
            train_time_s=self.train_time_s,
            final_val_accuracy=self.last_val_accuracy,
            stopped_at=stopped_at,
        )

    def _stop_now(self) -> bool:
        """Whether to stop before the next step: a request on this rank, or under parallelism one on any rank by the
        last step's all-reduce (so every rank stops at the same step and writes the same checkpoint together)."""
        return self._stop_requested if self.parallel is None else self._stop_agreed

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if self._tb is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, record["step"])
            elif key.endswith("_per_layer"):  # one curve per MoE layer
                for i, v in enumerate(value):
                    self._tb.add_scalar(f"{key[: -len('_per_layer')]}/moe_layer_{i}", v, record["step"])


class _NullLog:
    """The metrics log of a rank other than 0: it writes nothing (only rank 0 writes files)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def flush(self, sync: bool = False) -> int:
        return 0

    def close(self) -> None:
        pass
