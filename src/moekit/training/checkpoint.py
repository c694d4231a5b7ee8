"""Atomic, verifiable checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Layout: ``<root>/step_00000120/`` holding ``model.safetensors``, ``optimizer.safetensors`` (every optimizer state
tensor), ``state.json`` (config, step, RNG state, data position, counters, optimizer hyper-parameters) and
``manifest.json`` (the sha256 and size of each file). A checkpoint is written into ``<root>/.tmp-...``, each file
fsynced, the manifest written last, then the directory renamed into place: a crash at any moment leaves either the
old set of checkpoints or the new one, never a half-written ``step_*`` directory. On load the manifest is checked
byte for byte; a checkpoint that fails is reported by name and the previous one is tried.

Initial weights (a run that starts from given weights: an upcycled model, an imported one) are a smaller cousin:
``<run>/init/model.safetensors`` and ``<run>/init/manifest.json`` (its sha256 and size), written the same atomic way
by :func:`save_initial_weights` and read back, verified and strictly, by :func:`load_initial_weights`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from moekit.atomic import atomic_dir, write_synced
from moekit.errors import MoekitError

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "load_checkpoint",
    "latest_valid_checkpoint",
    "clean_partial",
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
MODEL_FILE, OPTIM_FILE, STATE_FILE, MANIFEST_FILE = (
    "model.safetensors",
    "optimizer.safetensors",
    "state.json",
    "manifest.json",
)


class CheckpointError(MoekitError):
    """A checkpoint is missing, partial or fails its checksum (the message names the file)."""


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
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``. Returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    model_sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    payload = {
        MODEL_FILE: st_save(model_sd),
        OPTIM_FILE: st_save(opt_tensors),
        STATE_FILE: json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1).encode(),
    }
    manifest = {"format": FORMAT, "step": step, "files": {}}
    # The same step written again (after a rollback) swaps the old directory out; see atomic_dir.
    with atomic_dir(final, fsync=True) as tmp:
        for name, data in payload.items():
            _write_bytes(tmp / name, data)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        _write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def verify_checkpoint(path: str | Path) -> dict[str, bytes]:
    """Read every file of a checkpoint and check it against the manifest; returns the verified bytes."""
    path = Path(path)
    mpath = path / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_bytes())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {mpath} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: manifest {mpath} is unreadable ({exc})") from None
    data: dict[str, bytes] = {}
    for name in (MODEL_FILE, OPTIM_FILE, STATE_FILE):
        fpath = path / name
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: manifest {mpath} does not list {name}")
        try:
            raw = fpath.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is incomplete: {fpath} is missing") from None
        if len(raw) != files[name]["bytes"] or hashlib.sha256(raw).hexdigest() != files[name]["sha256"]:
            raise CheckpointError(
                f"checkpoint file {fpath} fails its sha256 checksum (corrupted or truncated)"
            )
        data[name] = raw
    return data


def latest_valid_checkpoint(
    root: str | Path, report: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, bytes]] | None:
    """The newest checkpoint that verifies, with its bytes; each one that fails is passed to ``report``."""
    for path in list_checkpoints(root):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as exc:
            if report is not None:
                report(f"{exc}; trying the previous checkpoint")
    return None


def load_checkpoint(
    data: dict[str, bytes], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load verified checkpoint bytes into ``model`` (and ``optimizer``); returns the JSON state."""
    state = json.loads(data[STATE_FILE])
    try:
        model.load_state_dict(st_load(data[MODEL_FILE]), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not match the model built from its config: {exc}") from None
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_join(st_load(data[OPTIM_FILE]), state["optimizer"]))
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
