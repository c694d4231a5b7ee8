"""One training run end to end, for every task (:mod:`moekit.lab.training.tasks`): prepare the data, build the
model, train (under expert parallelism too), evaluate against the task's baseline, plot, and write
``summary.json``. ``moekit train`` is a thin wrapper. Loading a run directory again (eval, generate, analyze,
distill) is here too, and :class:`StopSignals`, which turns SIGTERM / SIGINT into a checkpoint and a clean stop
(``moekit train`` installs it; the core trainer installs no handler).

Run directory layout (the tokenizer and token arrays for a language model only)::

    config.toml            the resolved config (every default filled in)
    run_manifest.json      sha256 of config.toml and the data files, recorded when the run starts (verified by
                           eval, generate, analyze, distill and resume; runs made before it have none)
    .lock                  locked (flock) while a process trains the run; names the holder
    tokenizer.json         byte-level BPE trained on the training split
    data/tokens.safetensors  train and validation token ids (a resume or eval needs no corpus)
    metrics.jsonl          one JSON object per logged step
    init/                  a run started from given weights (upcycled, imported): model.safetensors + manifest.json,
                           loaded at step 0 when ``train.init_from`` names them (see checkpoint.py)
    checkpoints/step_*/    atomic checkpoints (see checkpoint.py)
    plots/*.png            loss curves and per-layer expert load
    summary.json           final figures
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.atomic import atomic_write_text
from moekit.errors import MoekitError
from moekit.lab.training.lock import hold_run_dir
from moekit.lab.training.run_config import RunConfig, build_run_config, layout_for_launch, to_toml, tomllib
from moekit.lab.training.size import check_memory
from moekit.lab.training.tasks import Task
from moekit.training import checkpoint as ckpt
from moekit.training.trainer import Trainer

__all__ = [
    "MANIFEST_FILE",
    "LoadedRun",
    "StopSignals",
    "TrainingInterrupted",
    "default_run_dir",
    "load_run",
    "load_trained_run",
    "read_run_config",
    "start_run_from_weights",
    "train_run",
    "verify_run_files",
    "write_run_manifest",
]

CONFIG_FILE = "config.toml"
MANIFEST_FILE = "run_manifest.json"


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


# The run manifest: sha256 of the files a run depends on besides its checkpoints (which carry their own), recorded
# when they are first written. Without it a flipped bit in the held-out tokens, or an ``lr`` edited in config.toml,
# changed an eval or a resume silently. A run made before manifests existed has none and is accepted as it is.
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_run_manifest(run_dir: str | Path, names: list[str] | tuple[str, ...], *, create: bool = True) -> None:
    """Record the sha256 of ``names`` (paths relative to ``run_dir``; those absent are skipped) in
    ``run_manifest.json``, keeping the other entries of an existing manifest. Without ``create`` a run that has no
    manifest (made before manifests existed) is left without one."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    if path.is_file():
        entries = _read_manifest(path)
    elif create:
        entries = {}
    else:
        return
    for name in names:
        if (run_dir / name).is_file():
            entries[name] = _sha256(run_dir / name)
    atomic_write_text(path, json.dumps({"format": 1, "sha256": entries}, indent=1) + "\n", fsync=True)


def _read_manifest(path: Path) -> dict[str, str]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["sha256"]
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise ValueError("sha256 is not a table of file names to digests")
        return dict(entries)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise MoekitError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); the run's files cannot be verified"
        ) from None


def verify_run_files(run_dir: str | Path) -> None:
    """Check the files recorded in ``run_manifest.json`` against their sha256: a missing or changed one is a
    one-line error naming it (saved data is never rebuilt behind the user's back). No manifest: nothing to check."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        return
    for name, digest in _read_manifest(path).items():
        file = run_dir / name
        if not file.is_file():
            raise MoekitError(
                f"{file} is missing: a run's saved files are never rebuilt (its checkpoints were trained with "
                "them); restore it from a backup"
            )
        if _sha256(file) != digest:
            if name == CONFIG_FILE:
                raise MoekitError(
                    f"{file} was edited since the run started (its sha256 differs from {MANIFEST_FILE}); restore "
                    f"it, and pass changes with --set instead (moekit train --resume {run_dir} --set train.KEY=VALUE)"
                )
            raise MoekitError(
                f"{file} fails its sha256 checksum (recorded in {MANIFEST_FILE}): it is damaged; restore it from a "
                "backup"
            )


def load_run(run_dir: str | Path, *, command: str | None = None) -> tuple[RunConfig, Any, torch.nn.Module]:
    """The config, data and (freshly initialised) model of an existing run directory, as its task prepares them
    (``PreparedData`` and a ``TransformerLM`` for a language model, ``ImageSplits`` and a ``ViT`` for an image
    classifier). With ``command``, a run whose task does not support that command is refused in one line."""
    run_dir = Path(run_dir)
    run_config = read_run_config(run_dir)
    task = run_config.task
    if command is not None:
        task.require(command, run_dir)
    verify_run_files(run_dir)
    data = task.prepare(run_config, run_dir, lambda msg: None)
    torch.manual_seed(run_config.train.seed)
    return run_config, data, task.build_model(task.model_for_data(run_config, data))


# Loading a trained run for eval, generate, analyze and distill. By default a newest checkpoint that fails its
# checksum is an error (an analysis of a silently older model would mislead); with ``fallback=True`` the newest
# checkpoint that passes is used and ``warn`` is told about each one skipped.
@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    data: Any  # what the task prepared: PreparedData (language model) or ImageSplits (ViT)
    model: torch.nn.Module  # TransformerLM or ViT
    checkpoint: Path
    step: int


def load_trained_run(
    run_dir: str | Path,
    *,
    fallback: bool = False,
    warn: Callable[[str], None] | None = None,
    command: str | None = None,
) -> LoadedRun:
    """The run in ``run_dir`` with the weights of its newest checkpoint (in eval mode); ``command`` as in
    :func:`load_run`. A run with no checkpoint yet whose ``train.init_from`` is set (created by
    :func:`start_run_from_weights`) loads those initial weights and reports step 0 (``checkpoint`` is their
    directory)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MoekitError(f"run directory {str(run_dir)!r} does not exist")
    run_config, data, model = load_run(run_dir, command=command)
    root = run_dir / "checkpoints"
    found_list = ckpt.list_checkpoints(root)
    init_from = run_config.train.init_from
    if not found_list and init_from is not None:
        # A run created from given weights (moekit upcycle) and not trained yet: its model is those weights.
        init_path = run_dir / init_from
        ckpt.load_initial_weights(init_path, model)
        model.eval()
        return LoadedRun(run_dir, run_config, data, model, init_path.parent, 0)
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


def start_run_from_weights(run_config: RunConfig, run_dir: str | Path, model: torch.nn.Module) -> None:
    """Create a run in ``run_dir`` that starts from ``model``'s weights: ``config.toml`` (``run_config`` resolved,
    with ``train.init_from = "init/model.safetensors"``) and the weights (:func:`moekit.training.checkpoint.
    save_initial_weights`). The caller has already put the run's data files there (``tokenizer.json``,
    ``data/tokens.safetensors``). ``moekit train --resume RUN_DIR`` then trains from these weights, and eval,
    generate, analyze and distill load them until the first checkpoint exists.

    Refuses (one line) a ``run_dir`` that already holds a run. The weights are written before the config, so a
    directory with a ``config.toml`` always has its weights.
    """
    run_dir = Path(run_dir)
    if (run_dir / "config.toml").exists() or ckpt.list_checkpoints(run_dir / "checkpoints"):
        raise MoekitError(f"{run_dir} already holds a run; choose another directory")
    config = dataclasses.replace(
        run_config, train=dataclasses.replace(run_config.train, init_from=ckpt.INIT_WEIGHTS)
    )
    built = getattr(model, "config", None)
    # The weights must fit the model the run config builds (checked now, not at the first resume): the same
    # config, but for the vocabulary, which the run's tokenizer fixes.
    stand_in = _VocabOnly(getattr(built, "vocab_size", 0), getattr(built, "eos_token_id", None))
    if built is not None and built != config.task.model_for_data(config, stand_in):
        raise MoekitError(
            "start_run_from_weights: the model's config differs from the run config's [model] section "
            "(beyond the vocabulary the tokenizer fixes)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_initial_weights(run_dir, model)
    atomic_write_text(run_dir / CONFIG_FILE, to_toml(config.resolved()))
    # Verified from the start (eval, generate and analyze of the new run check these files), like a trained run.
    write_run_manifest(run_dir, (CONFIG_FILE, *config.task.data_files))


@dataclass
class _VocabOnly:
    """Stands in for a model's prepared data where only its vocabulary (and, for an encoder-decoder, its
    end-of-sequence id) is needed (``model_for_data``)."""

    vocab_size: int
    eos_id: int | None = None


class TrainingInterrupted(BaseException):
    """A stop signal arrived while no trainer could take a checkpoint (before training began, or a second signal
    while the first one's checkpoint was being written): the run directory is as the last checkpoint left it.
    A ``BaseException``, as ``KeyboardInterrupt`` is, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While the block runs, SIGTERM (how schedulers stop jobs) and SIGINT (Ctrl-C) stop the training run cleanly:
    the trainer given to :meth:`attach` finishes its step, writes a checkpoint at that step and returns
    (``TrainResult.stopped``; under expert parallelism every rank stops at the same step). ``signum`` is the
    signal received (None: none). A signal before a trainer is attached, or a second one, raises
    :class:`TrainingInterrupted` at once. The previous handlers are restored when the block ends. Outside the main
    thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._trainer: Trainer | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._trainer = None

    def attach(self, trainer: Trainer) -> None:
        """From now on a signal asks ``trainer`` to stop (one that came already does so at once)."""
        self._trainer = trainer
        if self.signum is not None:
            trainer.request_stop()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise TrainingInterrupted(signum, f"stopped by a second {name} before the checkpoint was written")
        self.signum = signum
        if self._trainer is None:
            raise TrainingInterrupted(signum, f"stopped by {name} before training began")
        self._trainer.request_stop()  # only a flag: the trainer acts on it between two steps


def train_run(
    run_config: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns the summary also written to ``summary.json``.

    On resume the run's saved config is used; ``run_config`` (may be None) only supplies a new ``[train]``
    (and ``[parallel]``) section (e.g. a larger ``max_steps``): the model and data must stay what was trained.
    Under expert parallelism (``parallel.expert_parallel > 1``, one call per rank) a collective that fails or
    times out (a rank died or hangs) is raised as a one-line :class:`MoekitError`.

    With ``stop`` (an entered :class:`StopSignals`), a stop signal ends the run after a checkpoint at the current
    step: then no summary, plots or ``summary.json`` are made, and the returned dict has ``stopped_at`` (the
    checkpoint), ``steps`` and ``run_dir``.
    """
    try:
        return _train_run(run_config, run_dir, resume=resume, log=log, stop=stop)
    except RuntimeError as exc:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if isinstance(exc, MoekitError) or not distributed:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        timeout = run_config.parallel.timeout_s if run_config is not None else "the saved value"
        raise MoekitError(
            f"rank {torch.distributed.get_rank()}: a collective failed ({first}); another rank "
            f"probably died or hangs (parallel.timeout_s = {timeout})"
        ) from None


def _train_run(
    run_config: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool,
    log: Callable[[str], None] | None,
    stop: StopSignals | None,
) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    changes: list[str] = []
    if resume:
        loaded_config = read_run_config(run_dir)
        if run_config is not None:
            saved = copy.copy(loaded_config)  # before the new [train] and [parallel] replace its own
            saved_init = loaded_config.train.init_from
            loaded_config.train = run_config.train
            if loaded_config.train.init_from is None and saved_init is not None:
                # The starting weights belong to the run, not to this session's [train] values: a caller that
                # built a fresh [train] (only to change max_steps, say) must not start from a random init.
                loaded_config.train = dataclasses.replace(loaded_config.train, init_from=saved_init)
            loaded_config.parallel = run_config.parallel
            changes = _changes(saved, loaded_config)
        else:  # the layout is the launch's, not the saved run's: checkpoints reshard
            from moekit.training.distributed import launch_world_size

            loaded_config.parallel = layout_for_launch(loaded_config, launch_world_size())
            loaded_config.__post_init__()
        run_config = loaded_config
    elif run_config is None:
        raise ValueError("train_run needs a run_config for a new run")
    elif (run_dir / "config.toml").exists():
        raise MoekitError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    # Before any data work or process group: a model that cannot fit in this machine's memory is refused here.
    check_memory(run_config)
    from moekit.training.distributed import init_parallel_mesh

    par = run_config.parallel
    mesh = init_parallel_mesh(par.data_parallel, par.expert_parallel, par.timeout_s)
    distributed = mesh is not None
    is_main = not distributed or torch.distributed.get_rank() == 0
    if not is_main:  # only rank 0 writes files and user-facing lines
        log = lambda msg: None  # noqa: E731
    # Rank 0 holds the run directory's lock for the whole session (the other ranks share its run); a second
    # process training the same directory is refused before it writes anything.
    with hold_run_dir(run_dir) if is_main else contextlib.nullcontext(run_dir):
        if is_main and not resume and (run_dir / "config.toml").exists():  # another process started it meanwhile
            raise MoekitError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
        if is_main and resume:
            # First, before this session writes anything (config.toml below): on a disk that filled up, the
            # space a killed checkpoint write left behind is what the rest of the session needs.
            for p in ckpt.clean_partial(run_dir / "checkpoints"):
                log(f"removed a partial checkpoint left by an interrupted write: {p}")
            verify_run_files(run_dir)  # under the lock: the holder may have been rewriting config.toml
        if changes:
            log("resuming with changed values: " + "; ".join(changes))
        try:
            return _train_locked(run_config, run_dir, resume=resume, log=log, t0=t0, mesh=mesh, is_main=is_main,
                                 stop=stop)
        except BaseException:
            if is_main and not resume:
                _forget_failed_start(run_dir)
            raise


# What a new run writes before its first checkpoint that would make a retry take the directory for a started run
# (its data files stay: they record the [data] section they were made from, so a retry rebuilds or reuses them).
_START_FILES = (CONFIG_FILE, MANIFEST_FILE, "metrics.jsonl")


def _forget_failed_start(run_dir: Path) -> None:
    """After a new run failed before its first checkpoint: remove its config, manifest and metrics log, so that a
    retry (with the same or another config) starts afresh instead of being refused as an existing run."""
    if ckpt.list_checkpoints(run_dir / "checkpoints"):
        return
    for name in _START_FILES:
        (run_dir / name).unlink(missing_ok=True)


def _train_locked(
    run_config: RunConfig,
    run_dir: Path,
    *,
    resume: bool,
    log: Callable[[str], None],
    t0: float,
    mesh: Any,
    is_main: bool,
    stop: StopSignals | None,
) -> dict[str, Any]:
    """The body of :func:`train_run`, run while rank 0 holds the run directory's lock."""
    from moekit.training.distributed import ExpertParallel

    distributed = mesh is not None

    # The thread count is the process's: the caller applies train.threads (moekit train and compare do, with
    # moekit.lab.runtime.set_threads); a library function does not change a process-wide setting.
    threads = torch.get_num_threads()
    task = run_config.task
    data = _prepare(task, run_config, run_dir, log, distributed=distributed, is_main=is_main)
    model_config = task.model_for_data(run_config, data)
    cost = task.cost(model_config, run_config)
    batches = task.batches(run_config, data)
    eval_data = task.eval_data(run_config, data)
    if not resume:
        log(f"run directory: {run_dir}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, to_toml(run_config.resolved()))
        # A new run records its config and data as they are now, and so does the first session of a run created
        # from given weights (start_run_from_weights: upcycle, import-hf; it wrote a manifest already). Any other
        # resume records the config it rewrote (with the --set values), where the run has a manifest: a run made
        # before manifests existed keeps working without one.
        first_session = not resume or not ckpt.list_checkpoints(run_dir / "checkpoints")
        write_run_manifest(
            run_dir, (CONFIG_FILE, *task.data_files) if first_session else (CONFIG_FILE,), create=first_session
        )
    torch.manual_seed(run_config.train.seed)
    model = task.build_model(model_config)
    trainer = Trainer(
        run_config.train,
        model,
        batches,
        eval_data,
        run_dir,
        extra_state={"config": run_config.resolved()},
        log=log,
        parallel=ExpertParallel.from_mesh(model, mesh, fsdp=run_config.parallel.fsdp) if distributed else None,
    )
    if stop is not None:
        stop.attach(trainer)
    if resume:
        trainer.resume()
    if trainer.step == 0:
        log(
            f"model: {cost.parameters:,} parameters, {cost.active_parameters:,} active per "
            f"token, {cost.train_flops / 1e6:.1f} MFLOP per training {task.unit}; "
            f"{run_config.train.max_steps} steps of {task.batch_text(model_config, run_config)}, {threads} thread(s)"
        )
    result = trainer.fit()
    if result.stopped:
        # Stopped by a signal: the run is not finished, so no final figures; the caller says how to resume.
        return {"run_dir": str(run_dir), "steps": result.step, "stopped_at": str(result.stopped_at),
                "is_main": is_main}
    if not is_main:
        return {
            "run_dir": str(run_dir),
            "steps": result.step,
            "final_val_loss": result.final_val_loss,
            "is_main": False,
        }
    baseline = task.baseline(run_config, data)
    try:
        plots = [str(p) for p in task.plot(run_dir, baseline)]
    except Exception as exc:  # a plotting failure must not lose a finished run
        log(f"plotting failed: {exc}")
        plots = []
    summary = {
        "run_dir": str(run_dir),
        "arch": task.arch,
        "steps": result.step,
        "final_val_loss": result.final_val_loss,
        **task.final_metrics(result),
    }
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
            "parameters_total": cost.parameters,
            "parameters_active": cost.active_parameters,
            "train_flops_per_token": cost.train_flops_per_token,
            "plots": plots,
        }
    )
    summary.update(task.cost_figures(cost))
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _changes(saved: RunConfig, now: RunConfig) -> list[str]:
    """``section.key = new (was old)`` for every [train] and [parallel] value a resume changes (--set)."""
    out = []
    for section in ("train", "parallel"):
        before, after = getattr(saved, section), getattr(now, section)
        for f in dataclasses.fields(after):
            old, new = getattr(before, f.name), getattr(after, f.name)
            if old != new:
                out.append(f"{section}.{f.name} = {new!r} (was {old!r})")
    return out


def _prepare(
    task: Task, run_config: RunConfig, run_dir: Path, log: Callable[[str], None], *, distributed: bool, is_main: bool
) -> Any:
    """The task's data for this run. Under expert parallelism rank 0 prepares first (it may write the data into
    the run directory) and the others then read it: no two writers of one file."""
    if not distributed:
        return task.prepare(run_config, run_dir, log)
    if is_main:
        data = task.prepare(run_config, run_dir, log)
    torch.distributed.barrier()
    if not is_main:
        data = task.prepare(run_config, run_dir, log)
    return data
