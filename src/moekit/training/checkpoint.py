"""Atomic, verifiable checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Layout: ``<root>/step_00000120/`` holding ``model.safetensors``, ``optimizer.safetensors`` (every optimizer state
tensor), ``state.json`` (config, step, RNG state, data position, counters, optimizer hyper-parameters) and
``manifest.json`` (the sha256 and size of each file, and whether the checkpoint is healthy). A checkpoint is written
into ``<root>/.tmp-...``, each file fsynced, the manifest written last, then the directory renamed into place: a
crash at any moment leaves either the old set of checkpoints or the new one, never a half-written ``step_*``
directory. On load the manifest is checked key by key and every file byte for byte; a checkpoint that fails is
reported by name (one line) and the previous one is tried.

Distributed runs write *sharded* checkpoints instead (:mod:`moekit.training.sharded_checkpoint`: every rank its own
safetensors shards, the same ``step_*`` directories, manifest and guarantees). :func:`verify_checkpoint`,
:func:`load_checkpoint`, :func:`latest_valid_checkpoint` and :func:`unhealthy_reason` take either format, so a
reader (eval, generate, export-hf; the trainer's resume and roll-back) needs no branch: a sharded checkpoint loads
on one process, or on any ``(dp, ep)`` layout, with its shards resharded; :func:`prune_checkpoints` counts both.

Temporaries a killed writer left behind are removed at the start of the next write, before anything new is
written (on a full disk the space they hold may be what the next checkpoint needs). A write that runs out of space
removes its own partial directory and raises :class:`CheckpointSpaceError`; the earlier checkpoints are untouched.

A checkpoint is *healthy* when every weight is finite and the caller did not mark it otherwise (the trainer does
when the validation loss computed at that step is not finite). A roll-back of the non-finite policy only goes to a
healthy one (:func:`unhealthy_reason`); a checkpoint written before the flag existed counts as healthy when its
weights are finite. Pruning to the newest ``keep`` also keeps the newest healthy checkpoint when none of those is.

Initial weights (a run that starts from given weights: an upcycled model, an imported one) are a smaller cousin:
``<run>/init/model.safetensors`` and ``<run>/init/manifest.json`` (its sha256 and size), written the same atomic way
by :func:`save_initial_weights` and read back, verified and strictly, by :func:`load_initial_weights`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from moekit.atomic import atomic_dir, write_synced
from moekit.errors import MoekitError

if TYPE_CHECKING:
    from moekit.training.distributed import ExpertParallel

__all__ = [
    "CheckpointError",
    "CheckpointSpaceError",
    "VerifiedCheckpoint",
    "save_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "load_checkpoint",
    "latest_valid_checkpoint",
    "clean_partial",
    "prune_checkpoints",
    "remove_stale_temporaries",
    "unhealthy_reason",
    "rng_state",
    "set_rng_state",
    "save_initial_weights",
    "load_initial_weights",
    "INIT_WEIGHTS",
]

FORMAT = "moekit-checkpoint-1"
INIT_FORMAT = "moekit-init-weights-1"
# Where save_initial_weights puts the weights, relative to the run directory (train.init_from names this path).
INIT_WEIGHTS = "init/model.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# A temporary of moekit.atomic: ".tmp-<name>-<pid>-<8 hex>" (a directory being swapped out: ".trash-...").
_TEMP_DIR = re.compile(r"^\.(?:tmp|trash)-.+-(\d+)-[0-9a-f]{8}$")
# The disk is full (or the user's quota is): the one write failure the user fixes by freeing space.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MODEL_FILE, OPTIM_FILE, STATE_FILE, MANIFEST_FILE = (
    "model.safetensors",
    "optimizer.safetensors",
    "state.json",
    "manifest.json",
)


class CheckpointError(MoekitError):
    """A checkpoint is missing, partial or fails its checksum (the message names the file)."""


class CheckpointSpaceError(CheckpointError):
    """A checkpoint could not be written for lack of space; its partial directory was removed and the earlier
    checkpoints are intact (the message names the checkpoint)."""


_write_bytes = write_synced  # every checkpoint file is written (and fsynced) through this one name


def rng_state() -> dict[str, str]:
    """The torch CPU (and CUDA, when present) generator states, hex-encoded for JSON."""
    out = {"torch_cpu": bytes(torch.get_rng_state().tolist()).hex()}
    if torch.cuda.is_available():
        out["torch_cuda"] = [bytes(s.tolist()).hex() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(list(bytes.fromhex(state["torch_cpu"])), dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.tensor(list(bytes.fromhex(s)), dtype=torch.uint8) for s in state["torch_cuda"]]
        )


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    *,
    unhealthy: str | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` (and the newest healthy one). Returns
    its directory.

    ``unhealthy``: why the caller knows this checkpoint is not one to go back to (e.g. a non-finite validation
    loss at this step), recorded in the manifest; non-finite weights are found here. A full disk raises
    :class:`CheckpointSpaceError` and leaves no partial directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    # Before anything new is written: a stale partial checkpoint may hold the space this one needs.
    remove_stale_temporaries(root)
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    model_sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if unhealthy is None and not all_finite(model_sd):
        unhealthy = "non-finite weights"
    payload = {
        MODEL_FILE: st_save(model_sd),
        OPTIM_FILE: st_save(opt_tensors),
        STATE_FILE: json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1).encode(),
    }
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "healthy": unhealthy is None, "files": {}}
    if unhealthy is not None:
        manifest["unhealthy"] = unhealthy
    try:
        # The same step written again (after a rollback) swaps the old directory out; see atomic_dir.
        with atomic_dir(final, fsync=True) as tmp:
            for name, data in payload.items():
                _write_bytes(tmp / name, data)
                manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            _write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        # atomic_dir removed its temporary already; this also catches one it could not (it ignores errors).
        remove_stale_temporaries(root)
        raise CheckpointSpaceError(
            f"cannot write checkpoint {final}: no space left on the device; the partial checkpoint was removed and "
            "the earlier ones are intact (free some space, then resume)"
        ) from None
    prune_checkpoints(root, keep)
    return final


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point (or complex) tensor of ``tensors`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point() or t.is_complex())


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (of either format); when none of those is healthy, the newest
    healthy older one stays too, so that a roll-back still has somewhere to go."""
    found = list_checkpoints(root)
    old = found[keep:]
    if old and not any(_recorded_health(p) is not False for p in found[:keep]):
        for p in old:
            if _recorded_health(p) is not False:
                old.remove(p)
                break
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


def _recorded_health(path: Path) -> bool | None:
    """The manifest's health flag; None when it has none (written before the flag existed) or cannot be read."""
    try:
        flag = json.loads((path / MANIFEST_FILE).read_bytes()).get("healthy")
    except (OSError, ValueError, AttributeError):
        return None
    return flag if isinstance(flag, bool) else None


def remove_stale_temporaries(root: Path) -> None:
    """Remove the temporaries of writers that are gone: a ``.tmp-`` / ``.trash-`` directory whose process no longer
    exists (killed mid-write), or this process's own (a write that failed). A live process's temporary is left
    alone (:func:`clean_partial`, called under the run directory's lock, removes every one)."""
    for p in root.iterdir():
        m = _TEMP_DIR.match(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not _process_exists(pid):
            shutil.rmtree(p, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (or a pid beyond the system's range)
        return True
    return True


def list_checkpoints(root: str | Path) -> list[Path]:
    """``step_*`` directories, newest first (temp directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def clean_partial(root: str | Path) -> list[Path]:
    """Remove temp directories a killed process left behind; returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


_KIND_NAMES = {bool: "a boolean", int: "an integer", str: "a string", dict: "an object"}


def read_manifest(
    path: Path, *, fmt: str = FORMAT, required: tuple[str, ...] = (MODEL_FILE, OPTIM_FILE, STATE_FILE),
    every_file: bool = False,
) -> dict[str, Any]:
    """The checkpoint's manifest, every key it must have present with the right type; else a one-line
    :class:`CheckpointError` naming the file and the key (valid JSON is not enough: a manifest missing a size
    would otherwise end in a ``KeyError`` traceback, a size given as text in a misleading checksum failure).

    ``fmt`` is the format it must declare and ``required`` the files it must list; with ``every_file`` each listed
    file's entry is checked, not only the required ones' (a sharded checkpoint lists one file per writing rank)."""
    mpath = path / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {mpath} is missing") from None
    except (OSError, ValueError) as exc:  # unreadable, not JSON, or not UTF-8
        raise CheckpointError(f"checkpoint {path}: manifest {mpath} is unreadable ({exc})") from None

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: manifest {mpath} is damaged ({what})")

    def field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
        if key not in obj:
            raise bad(f"{where}{key!r} is missing")
        value = obj[key]
        # bool is an int in Python; a size or a step of `true` is still wrong.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise bad(f"{where}{key!r} is {type(value).__name__} {value!r}, not {_KIND_NAMES[kind]}")
        return value

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if field(manifest, "format", str, "") != fmt:
        raise bad(f"unknown format {manifest['format']!r}")
    step = field(manifest, "step", int, "")
    m = _STEP_DIR.match(path.name)
    if m is not None and int(m.group(1)) != step:
        raise bad(f"'step' is {step}, but the directory is {path.name}")
    if "healthy" in manifest:
        field(manifest, "healthy", bool, "")
    files = field(manifest, "files", dict, "")
    for name in required:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: manifest {mpath} does not list {name}")
    for name in files if every_file else required:
        entry = field(files, name, dict, "files ")
        field(entry, "bytes", int, f"files {name!r} ")
        digest = field(entry, "sha256", str, f"files {name!r} ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise bad(f"files {name!r} 'sha256' is {digest!r}, not 64 hexadecimal digits")
    return manifest


class VerifiedCheckpoint(dict[str, bytes]):
    """A checkpoint that passed its checks: the verified bytes of the files that were read, by name, and where the
    checkpoint is (``path``), its format (``sharded``) and its manifest.

    Single-file: ``model.safetensors``, ``optimizer.safetensors`` and ``state.json``. Sharded: ``state.json`` only;
    the shards stay on disk (they may not fit in one process's memory) and :func:`load_checkpoint` has DCP read the
    chunks each rank needs."""

    def __init__(self, files: dict[str, bytes], path: Path, *, sharded: bool, manifest: dict[str, Any]) -> None:
        super().__init__(files)
        self.path = path
        self.sharded = sharded
        self.manifest = manifest


def _is_sharded(path: Path, parallel: ExpertParallel | None) -> bool:
    """Whether ``path`` holds a sharded checkpoint (rank 0's reading, on every rank: all must take the same path)."""
    from moekit.training.sharded_checkpoint import is_sharded_checkpoint

    sharded = is_sharded_checkpoint(path)
    return sharded if parallel is None else parallel.broadcast(sharded)


def _verify_single_file(path: Path) -> VerifiedCheckpoint:
    manifest = read_manifest(path)
    files = manifest["files"]
    data: dict[str, bytes] = {}
    for name in (MODEL_FILE, OPTIM_FILE, STATE_FILE):
        fpath = path / name
        try:
            raw = fpath.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is incomplete: {fpath} is missing") from None
        if len(raw) != files[name]["bytes"] or hashlib.sha256(raw).hexdigest() != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint file {fpath} fails its sha256 checksum (corrupted or truncated)")
        data[name] = raw
    return VerifiedCheckpoint(data, path, sharded=False, manifest=manifest)


def verify_checkpoint(path: str | Path, parallel: ExpertParallel | None = None) -> VerifiedCheckpoint:
    """Check every file of a checkpoint, single-file or sharded, against its manifest; returns what was verified
    (the files' bytes by name, a ``dict``; see :class:`VerifiedCheckpoint`). A failure is a one-line
    :class:`CheckpointError` naming the file.

    Collective under ``parallel`` (every rank calls it): the ranks agree on the verdict, so that none loads a
    checkpoint another refused. A sharded checkpoint's files are split over the ranks; a single-file one is read
    whole by every rank (each loads it)."""
    path = Path(path)
    if _is_sharded(path, parallel):
        from moekit.training.sharded_checkpoint import verify_sharded

        manifest = verify_sharded(path, parallel)
        # Read again here (a few KiB) and checked again: the bytes returned are the ones that were verified.
        fpath, entry = path / STATE_FILE, manifest["files"][STATE_FILE]
        raw = fpath.read_bytes()
        if len(raw) != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {fpath} fails its sha256 checksum (corrupted or truncated)")
        return VerifiedCheckpoint({STATE_FILE: raw}, path, sharded=True, manifest=manifest)
    if parallel is None:
        return _verify_single_file(path)
    problem: str | None = None
    try:
        data = _verify_single_file(path)
    except CheckpointError as exc:
        problem = str(exc)
    except OSError as exc:  # not left to one rank: the others would wait for it in the next collective
        problem = f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})"
    problem = next((p for p in parallel.gather(problem) if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    return data


def unhealthy_reason(path: str | Path, data: dict[str, bytes]) -> str | None:
    """Why the verified checkpoint ``path`` (``data``: what :func:`verify_checkpoint` returned) is not one to roll
    back to, or None when it is healthy. A checkpoint written before the health flag existed is healthy when its
    weights are finite."""
    path = Path(path)
    sharded = isinstance(data, VerifiedCheckpoint) and data.sharded
    manifest = data.manifest if isinstance(data, VerifiedCheckpoint) else read_manifest(path)
    healthy = manifest.get("healthy")
    if healthy is None:
        if sharded:
            from moekit.training.sharded_checkpoint import shards_finite

            finite = shards_finite(path)
        else:
            finite = all_finite(st_load(data[MODEL_FILE]))
        return None if finite else "non-finite weights"
    if healthy:
        return None
    reason = manifest.get("unhealthy")
    return reason if isinstance(reason, str) and reason else "recorded as unhealthy"


def latest_valid_checkpoint(
    root: str | Path, report: Callable[[str], None] | None = None, parallel: ExpertParallel | None = None
) -> tuple[Path, VerifiedCheckpoint] | None:
    """The newest checkpoint (single-file or sharded) that verifies, with what was verified; each one that fails is
    passed to ``report``. Collective under ``parallel``: every rank walks rank 0's list and they agree on each."""
    found = list_checkpoints(root)
    if parallel is not None:
        found = parallel.broadcast(found)
    for path in found:
        try:
            return path, verify_checkpoint(path, parallel)
        except CheckpointError as exc:
            if report is not None:
                report(f"{exc}; trying the previous checkpoint")
    return None


def load_checkpoint(
    data: dict[str, bytes],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    parallel: ExpertParallel | None = None,
) -> dict[str, Any]:
    """Load a verified checkpoint (what :func:`verify_checkpoint` returned) into ``model`` (and ``optimizer``);
    returns the JSON state.

    A sharded checkpoint loads into the model as it is laid out: on one process (``parallel`` None, no process
    group needed) with full expert banks, under ``parallel`` (collective) with the banks sliced over its ``ep``
    group or full, whatever layout it was saved at. A single-file checkpoint holds the single-process layout: under
    expert parallelism, gather the experts first (``ExpertParallel.unshard``); under FSDP each rank keeps its shard
    of every full tensor."""
    if isinstance(data, VerifiedCheckpoint) and data.sharded:
        from moekit.training.sharded_checkpoint import load_sharded

        return load_sharded(data.path, model, optimizer, parallel, verify=False)
    state = json.loads(data[STATE_FILE])
    weights = st_load(data[MODEL_FILE])
    if parallel is not None:  # FSDP's shards (if cut) take their part of each full tensor
        weights = parallel.distribute_full(weights, model.state_dict(keep_vars=True))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not match the model built from its config: {exc}") from None
    if optimizer is not None:
        optim_state = _optimizer_join(st_load(data[OPTIM_FILE]), state["optimizer"])
        if parallel is not None:
            optim_state = parallel.distribute_optimizer_state(optim_state, optimizer)
        optimizer.load_state_dict(optim_state)
    return state


def save_initial_weights(run_dir: str | Path, model: nn.Module) -> Path:
    """Write ``model``'s weights as ``run_dir/init/model.safetensors`` with ``run_dir/init/manifest.json`` (format,
    sha256 and size), atomically: a directory built beside ``init/`` and renamed into place, so a crash leaves the
    old ``init/`` or the new one. Returns the weights' path (``run_dir / INIT_WEIGHTS``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / INIT_WEIGHTS
    data = st_save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    manifest = {
        "format": INIT_FORMAT,
        "files": {target.name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
    }
    with atomic_dir(target.parent, fsync=True) as tmp:
        _write_bytes(tmp / target.name, data)
        _write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    return target


def load_initial_weights(path: str | Path, model: nn.Module) -> None:
    """Check the weights file ``path`` against the ``manifest.json`` beside it and load it into ``model`` strictly.
    Every failure (missing file or manifest, wrong size or sha256, tensors that do not fit the model) is a one-line
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    mpath = path.parent / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_bytes())
        entry = manifest["files"][path.name]
        if manifest.get("format") != INIT_FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        size, digest = int(entry["bytes"]), str(entry["sha256"])
    except FileNotFoundError:
        raise CheckpointError(f"initial weights {path}: the manifest {mpath} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"initial weights {path}: manifest {mpath} is unreadable or does not list the file "
                              f"({type(exc).__name__}: {exc})") from None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"initial weights {path} are missing") from None
    if len(raw) != size or hashlib.sha256(raw).hexdigest() != digest:
        raise CheckpointError(f"initial weights {path} fail their sha256 checksum (corrupted or truncated)")
    try:
        model.load_state_dict(st_load(raw), strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())
        raise CheckpointError(f"initial weights {path} do not match the model built from the config: {first}") from None
