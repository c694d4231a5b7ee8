"""Sharded checkpoints: every rank writes its own shards with torch.distributed.checkpoint (DCP), in safetensors,
and a checkpoint loads into any other ``(dp, ep)`` layout or into one process.

Why: a single-file checkpoint (:mod:`moekit.training.checkpoint`) gathers the whole model on rank 0, which stops at
one node's memory. Here each rank writes the chunks it holds and reads the chunks it needs.

What is saved: the model's parameters and buffers under their ``state_dict`` names and every optimizer state tensor
as ``optim/<parameter name>/<key>`` (AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step``), all as logical tensors in the
single-process (full) shapes. An expert bank sliced over the ``ep`` group (``[E / ep, ...]`` on each rank) is a
``DTensor`` on the ``("dp", "ep")`` mesh with placements ``[Replicate(), Shard(0)]`` (on the 1-D ``("ep",)`` mesh
with ``[Shard(0)]`` when there is no ``dp`` group), so its ``E`` rows are written once, each chunk by one of the
ranks holding it; under FSDP a non-expert weight and its per-element optimizer state are FSDP's own DTensors (dim-0
chunks over all ranks), written and read as they are; every other tensor is a plain (replicated) tensor. DCP's
planner drops the duplicates and gives each chunk to the holder with the least to write so far, so the ``dp``
replicas share the writing. The optimizer's hyper-parameters and non-tensor state go to ``state.json`` with the
caller's JSON state.

Format: safetensors, never pickle. DCP's default ``FileSystemWriter`` writes its ``.metadata`` file in Python's object
serialisation format, which loading would have to execute; this
module uses ``HuggingFaceStorageWriter(save_distributed=True)``, which writes one file per rank that has anything to
write, ``shard-<rank + 1, 5 digits>-model-00001-of-00001.safetensors``, records each chunk's offset in the full
tensor in the file's safetensors header (JSON, ``DCP_SHARDING_INFO``) and writes no metadata file at all;
``HuggingFaceStorageReader`` rebuilds the chunk map from those headers (``safe_open`` + ``json.loads``) and reads the
chunks with ``safe_open(...).get_slice``: nothing on the read path deserialises Python objects.

Layout: ``<root>/step_00000120/`` holding the shard files, ``state.json`` (the caller's state, the step, the
optimizer's hyper-parameters, the tensor index: full shape and dtype of every saved tensor) and ``manifest.json``
(format, step, the layout it was saved with, whether the checkpoint is healthy, and each file's sha256, size and
writing rank). The directory name is the one :func:`moekit.training.checkpoint.list_checkpoints` lists, and
:func:`moekit.training.checkpoint.verify_checkpoint` / ``load_checkpoint`` / ``latest_valid_checkpoint`` read
either format (the trainer and the one-process readers go through them).

Guarantees, as for the single-file checkpoints:

- *atomic*: the shards are written into ``<root>/.tmp-step_00000120-<pid>-<hex>`` (rank 0 creates it with
  :func:`moekit.atomic.atomic_dir`; its name is broadcast), each file fsynced; once every rank has written and
  hashed its files, rank 0 writes ``state.json`` and, last, ``manifest.json``, then renames the directory into place.
  A checkpoint exists only when complete; a temporary a killed run left behind is not listed and
  :func:`~moekit.training.checkpoint.clean_partial` removes it (and the next save, once its writer is gone). A
  failure on any rank is agreed on by all ranks (no rank is left waiting in a collective) and raises
  :class:`CheckpointError` on every rank, leaving no directory; a full disk (or quota) on any rank raises
  :class:`~moekit.training.checkpoint.CheckpointSpaceError`, one line.
- *verified*: before anything is read, every file is checked against its sha256 and size in the manifest (the files
  are split over the ranks, the verdicts shared); a missing, damaged, or unlisted file raises
  :class:`CheckpointError` on every rank, one line naming it. A file altered between that check and DCP's read of
  it is not caught (the single-file checkpoint reads the bytes it verified; DCP reads the files itself).
- *healthy*: as for single-file checkpoints, the manifest records whether every weight (on every rank) is finite and
  the caller did not mark the checkpoint otherwise (``unhealthy``: the trainer's non-finite validation loss); a
  roll-back goes only to a healthy one.
- *keep-last-K*: ``keep`` prunes to the newest ``keep`` ``step_*`` directories (of either kind) after a commit, and
  keeps the newest healthy one when none of those is (the single-file rule,
  :func:`~moekit.training.checkpoint.prune_checkpoints`).

Every function is collective when ``parallel`` is given: all ranks call it in the same order. Checkpoints are
written to a file system every rank sees (the usual for multi-node DCP). DCP and DTensor are imported when a
function here first needs them: importing them takes a second or two, which every command that imports the trainer
would otherwise pay.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.atomic import atomic_dir, write_synced
from moekit.layers.expert_parallel import expert_parameters, is_expert_parallel
from moekit.training.checkpoint import (
    CheckpointError,
    CheckpointSpaceError,
    all_finite,
    prune_checkpoints,
    read_manifest,
    remove_stale_temporaries,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moekit.training.distributed import ExpertParallel

__all__ = ["SHARDED_FORMAT", "save_sharded", "load_sharded", "verify_sharded", "is_sharded_checkpoint",
           "shards_finite"]

SHARDED_FORMAT = "moekit-sharded-checkpoint-1"
STATE_FILE, MANIFEST_FILE = "state.json", "manifest.json"
OPTIM_PREFIX = "optim/"
# The disk is full (or the user's quota is): the one write failure the user fixes by freeing space.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# safetensors' writer (Rust) reports an I/O failure as its own error, with the errno only in the message.
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


# -- layout ----------------------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """How this rank holds the model: which parameters are expert slices over the ``ep`` group, and the mesh that
    describes them to DCP. ``mesh`` is None on one process and when no bank is sliced (ep = 1)."""

    parallel: ExpertParallel | None
    sliced: set[int] = field(default_factory=set)  # id() of the expert parameters sliced along dim 0
    mesh: DeviceMesh | None = None
    placements: tuple = ()

    @property
    def ep(self) -> int:
        return 1 if self.mesh is None else self.parallel.ep

    def logical(self, local: Tensor, sliced: bool) -> Tensor:
        """``local`` as DCP should see it: a DTensor of the full shape for an expert slice, else itself."""
        if not sliced:
            return local
        from torch.distributed.tensor import DTensor

        full = (local.shape[0] * self.ep, *local.shape[1:])
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=torch.Size(full),
                                  stride=_contiguous_stride(full))


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def _layout(model: nn.Module, parallel: ExpertParallel | None) -> _Layout:
    """The layout of ``model`` on this rank (collective under ``parallel``: one all-gather of mesh coordinates)."""
    if parallel is None:
        return _Layout(None)
    # Every rank's (global rank, dp index, ep index): the mesh's rank grid, whatever groups the caller built.
    ep_index = dist.get_rank(parallel.ep_group)
    dp_index = 0 if parallel.dp_group is None else dist.get_rank(parallel.dp_group)
    coords = parallel.gather((dist.get_rank(), dp_index, ep_index))
    sliced = is_expert_parallel(model) and parallel.ep > 1
    if not sliced:
        # ep = 1 (or banks not sliced yet): every rank holds the full banks; plain tensors, written once.
        return _Layout(parallel)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard

    grid_DE = torch.zeros(parallel.dp, parallel.ep, dtype=torch.int)  # D: dp index, E: ep index
    for global_rank, d, e in coords:
        grid_DE[d, e] = global_rank
    device = next(iter(model.parameters())).device.type
    if parallel.dp_group is None:
        mesh = DeviceMesh.from_group(parallel.ep_group, device, mesh_dim_names=("ep",))
        placements: tuple = (Shard(0),)
    else:
        mesh = DeviceMesh.from_group([parallel.dp_group, parallel.ep_group], device, grid_DE,
                                     mesh_dim_names=("dp", "ep"))
        placements = (Replicate(), Shard(0))
    return _Layout(parallel, {id(p) for p in expert_parameters(model)}, mesh, placements)


def _state_slices(p: Tensor, value: Tensor, layout: _Layout) -> bool:
    """Whether optimizer state ``value`` of parameter ``p`` is sliced like ``p``: the rule of
    :func:`moekit.layers.expert_parallel.unshard_experts_` (per-expert tensors, 2-D or more, leading dim E / ep)."""
    return id(p) in layout.sliced and value.dim() >= 2 and value.shape[0] == p.shape[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- collectives that also run on one process ------------------------------------------------------------------------
def _broadcast(parallel: ExpertParallel | None, value: Any) -> Any:
    return value if parallel is None else parallel.broadcast(value)


def _gather(parallel: ExpertParallel | None, value: Any) -> list[Any]:
    return [value] if parallel is None else parallel.gather(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _rank_failures(exc: BaseException) -> list[tuple[int | None, BaseException]]:
    """The failures ``exc`` stands for: DCP raises one ``CheckpointException`` on every rank, holding each failed
    rank's own exception (its ``str`` is several tracebacks, not a line for the user); anything else is itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return [(rank, pair[0] if isinstance(pair, tuple) else pair) for rank, pair in sorted(failures.items())]
    return [(None, exc)]


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk or an exceeded quota."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        match = _OS_ERROR_IN_MESSAGE.search(str(e)) if type(e).__name__ == "SafetensorError" else None
        if match and int(match.group(1)) in _NO_SPACE:
            return True
        todo += [e.__cause__, e.__context__]
    return False


def _failure(rank: int, exc: BaseException) -> tuple[str, bool]:
    """A failed step of a save as (one line naming the rank, whether the disk is full)."""
    failed = _rank_failures(exc)
    who, first = failed[0]
    text = f"rank {rank if who is None else who}: {_one_line(first)}"
    return text, any(_no_space(e) for _, e in failed)


def _is_failure(exc: BaseException) -> bool:
    """An exception a save or load reports as its failure: any ``Exception``, and DCP's ``CheckpointException``
    (a ``BaseException``, raised on every rank when one fails); not an interrupt."""
    return isinstance(exc, Exception) or type(exc).__name__ == "CheckpointException"


# -- save ------------------------------------------------------------------------------------------------------------
def _collect(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, layout: _Layout
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The tensors DCP writes (name -> plain tensor or DTensor) and the optimizer's JSON part."""
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        tensors[name] = layout.logical(t.detach(), id(t) in layout.sliced)
    if optimizer is None:
        return tensors, None
    names = {id(p): n for n, p in model.named_parameters()}
    groups, scalars = [], {}
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not one of the model's")
            name = names[id(p)]
            group_names.append(name)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"{OPTIM_PREFIX}{name}/{key}"] = layout.logical(value.detach(),
                                                                          _state_slices(p, value, layout))
                else:
                    scalars.setdefault(name, {})[key] = value
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _index(tensors: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Full shape and dtype of every saved tensor (a DTensor's ``shape`` is its full shape)."""
    return {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()}


def _file_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of a file, read in 8 MiB blocks (a shard may be large)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _dcp_write(tmp: Path, tensors: dict[str, Tensor], parallel: ExpertParallel | None) -> list[str]:
    """Write this rank's chunks of ``tensors`` into ``tmp`` with DCP; returns the names of the files it wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    class _Writer(HuggingFaceStorageWriter):
        """Remembers which files this rank wrote (each rank hashes its own, while they are in its page cache)."""

        written: tuple[str, ...] = ()  # a rank with nothing to write writes no file

        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            # The file system writer finishes before returning (its future is already set).
            self.written = tuple(sorted({r.storage_data.relative_path for r in fut.wait()}))
            return fut

    writer = _Writer(str(tmp), save_distributed=True)
    with warnings.catch_warnings():
        # One process saves without a process group on purpose; DCP warns that it assumes so.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, storage_writer=writer, process_group=None if parallel is None else parallel.group,
                 no_dist=parallel is None)
    return list(writer.written)


def save_sharded(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    parallel: ExpertParallel | None,
    state: dict[str, Any],
    *,
    keep: int | None = None,
    unhealthy: str | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``model`` (and ``optimizer``) as ``root/step_<step:08d>``, every rank its own
    chunks, atomically; then keep only the newest ``keep`` checkpoints and the newest healthy one (None: keep all).
    ``state``: JSON-able values (config, data position, RNG states...) saved in ``state.json``. Returns the
    checkpoint's directory.

    ``unhealthy``: why the caller knows this checkpoint is not one to go back to (e.g. a non-finite validation loss
    at this step), recorded in the manifest; non-finite weights on any rank are found here.

    Collective under ``parallel`` (the model as it runs there: expert banks sliced over the ``ep`` group or not).
    Any rank's failure raises :class:`CheckpointError` on every rank and leaves no checkpoint directory; a full disk
    on any rank raises :class:`CheckpointSpaceError`."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    layout = _layout(model, parallel)
    tensors, optim_meta = _collect(model, optimizer, layout)
    # This rank's slices and replicas; rank 0 learns every rank's verdict with the reports.
    finite = all_finite({n: _local(t) for n, t in model.state_dict().items()})
    main = parallel is None or parallel.is_main
    rank = 0 if parallel is None else parallel.rank

    # 1. Rank 0 creates the temporary directory; every rank learns its name (or rank 0's failure).
    commit = None  # rank 0: the atomic_dir context; leaving it without an error renames the temporary into place
    tmp_name: str | None = None
    failure: tuple[str, bool] | None = None  # (one line, whether the disk is full)
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Before anything new is written: a killed writer's partial checkpoint may hold the space this one needs.
            remove_stale_temporaries(root)
            commit = atomic_dir(final, fsync=True)
            tmp_name = str(commit.__enter__())
        except OSError as exc:
            commit, failure = None, _failure(0, exc)
    tmp_name, failure = _broadcast(parallel, (tmp_name, failure))
    tmp = Path(tmp_name) if tmp_name is not None else None
    try:
        # 2. Every rank writes its chunks (DCP raises on every rank when one fails), 3. then hashes its files.
        mine: dict[str, dict[str, Any]] = {}
        local_failure: tuple[str, bool] | None = None
        if failure is None:
            try:
                for name in _dcp_write(tmp, tensors, parallel):
                    digest, size = _file_digest(tmp / name)
                    mine[name] = {"sha256": digest, "bytes": size, "rank": rank}
            except BaseException as exc:  # shared with every rank below, then raised
                if not _is_failure(exc):
                    raise
                local_failure = _failure(rank, exc)
        # 4. Rank 0 learns every rank's files (this is also the barrier: every write is done) and commits.
        reports = _gather(parallel, (mine, local_failure, finite))
        if commit is not None:
            try:
                failure = failure or next((f for _, f, _ in reports if f is not None), None)
                if failure is None:
                    files = {name: entry for part, _, _ in reports for name, entry in part.items()}
                    if unhealthy is None and not all(ok for _, _, ok in reports):
                        unhealthy = "non-finite weights"
                    _write_state_and_manifest(tmp, files, step, parallel,
                                              {**state, "step": step, "optimizer": optim_meta,
                                               "tensors": _index(tensors)}, unhealthy)
                    done, commit = commit, None
                    done.__exit__(None, None, None)  # the rename: from here on the checkpoint exists
            except Exception as exc:  # shared with every rank below, then raised
                failure = failure or _failure(0, exc)
            if failure is None and keep is not None:
                _prune(root, keep)
    finally:
        if commit is not None:
            # Not committed (a failure, or an interrupt): atomic_dir removes the temporary when told of an error.
            reason = failure[0] if failure is not None else "interrupted"
            commit.__exit__(CheckpointError, CheckpointError(reason), None)
            # And one it could not remove (it ignores errors there), as the single-file writer does.
            with contextlib.suppress(OSError):
                remove_stale_temporaries(root)
    # 5. Every rank learns the outcome, so none goes on as if a failed checkpoint existed.
    failure = _broadcast(parallel, failure)
    if failure is not None:
        text, no_space = failure
        if no_space:
            raise CheckpointSpaceError(
                f"cannot write checkpoint {final}: no space left on the device ({text}); the partial checkpoint was "
                "removed and the earlier ones are intact (free some space, then resume)"
            )
        raise CheckpointError(f"cannot write checkpoint {final}: {text}")
    return final


def _write_state_and_manifest(
    tmp: Path,
    files: dict[str, dict[str, Any]],
    step: int,
    parallel: ExpertParallel | None,
    state: dict[str, Any],
    unhealthy: str | None,
) -> None:
    """Rank 0's part of a commit: ``state.json``, then (last: a directory with a manifest is complete) the
    manifest listing every file with its sha256, size and writing rank, and whether the checkpoint is healthy."""
    data = json.dumps(state, indent=1).encode()
    write_synced(tmp / STATE_FILE, data)
    files[STATE_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rank": 0}
    manifest = {
        "format": SHARDED_FORMAT,
        "step": step,
        "layout": {"world": 1, "dp": 1, "ep": 1} if parallel is None else
                  {"world": parallel.world, "dp": parallel.dp, "ep": parallel.ep},
        "healthy": unhealthy is None,
        "files": dict(sorted(files.items())),
    }
    if unhealthy is not None:
        manifest["unhealthy"] = unhealthy
    write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and the newest healthy one, by the single-file rule
    (:func:`moekit.training.checkpoint.prune_checkpoints`; rank 0, after a commit; the new one always stays). A
    failure to delete is not the new checkpoint's failure: it is left for the next prune."""
    with contextlib.suppress(OSError):
        prune_checkpoints(root, max(keep, 1))


# -- verify ----------------------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest, checked key by key as a single-file one is (:func:`read_manifest`), every
    listed file's entry included; else a one-line :class:`CheckpointError` naming it."""
    manifest = read_manifest(path, fmt=SHARDED_FORMAT, required=(STATE_FILE,), every_file=True)
    for name in manifest["files"]:
        # Plain names only: the manifest must not point DCP (or a check) outside the directory.
        if "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST_FILE:
            raise CheckpointError(f"checkpoint {path}: manifest {path / MANIFEST_FILE} is damaged (file name {name!r})")
    return manifest


def _check_files(path: Path, manifest: dict[str, Any], names: list[str]) -> str | None:
    """The first problem with the files ``names`` of checkpoint ``path`` (one line), or None."""
    files = manifest["files"]
    for name in names:
        fpath = path / name
        try:
            digest, size = _file_digest(fpath)
        except FileNotFoundError:
            return f"checkpoint {path} is incomplete: {fpath} is missing"
        except OSError as exc:
            return f"checkpoint file {fpath} cannot be read ({_one_line(exc)})"
        if size != files[name]["bytes"] or digest != files[name]["sha256"]:
            return f"checkpoint file {fpath} fails its sha256 checksum (corrupted or truncated)"
    return None


def _unlisted(path: Path, manifest: dict[str, Any]) -> str | None:
    """A file in ``path`` the manifest does not list (DCP's reader would read any ``.safetensors`` there), or None."""
    listed = set(manifest["files"]) | {MANIFEST_FILE}
    extra = sorted(p.name for p in path.iterdir() if p.name not in listed)
    return f"checkpoint {path} holds {path / extra[0]}, which its manifest does not list" if extra else None


def verify_sharded(path: str | Path, parallel: ExpertParallel | None = None) -> dict[str, Any]:
    """Check every file of the sharded checkpoint ``path`` against its manifest (under ``parallel`` the files are
    split over the ranks and the verdicts shared); returns the manifest. Any problem raises one-line
    :class:`CheckpointError` naming the file, on every rank."""
    path = Path(path)
    manifest: dict[str, Any] | None = None
    problem: str | None = None
    try:
        manifest = _read_manifest(path)
        problem = _unlisted(path, manifest)
        if problem is None:
            rank, world = (0, 1) if parallel is None else (parallel.rank, parallel.world)
            problem = _check_files(path, manifest, sorted(manifest["files"])[rank::world])
    except CheckpointError as exc:
        problem = str(exc)
    except OSError as exc:  # the directory itself is missing or unreadable
        problem = f"checkpoint {path} cannot be read ({_one_line(exc)})"
    problem = next((p for p in _gather(parallel, problem) if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    return manifest


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether the directory ``path`` holds a manifest of this format (read only; nothing is verified)."""
    try:
        return json.loads((Path(path) / MANIFEST_FILE).read_bytes()).get("format") == SHARDED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def shards_finite(path: str | Path) -> bool:
    """Whether every model weight in the shards of the (verified) checkpoint ``path`` is finite, read chunk by chunk
    on one process (optimizer state is not a weight). For a checkpoint whose manifest has no health flag."""
    from safetensors import safe_open

    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if not key.startswith(OPTIM_PREFIX) and (t.is_floating_point() or t.is_complex()) \
                        and not bool(torch.isfinite(t).all()):
                    return False
    return True


# -- load ------------------------------------------------------------------------------------------------------------
def _targets(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, layout: _Layout, index: dict[str, dict[str, Any]],
    path: Path,
) -> tuple[dict[str, Tensor], dict[str, tuple[nn.Parameter, str]]]:
    """Fresh tensors in this rank's layout for DCP to fill (name -> plain tensor or DTensor), checked against the
    checkpoint's index; and, for each optimizer entry, its parameter and key. The model is untouched until every
    chunk has been read."""

    def mismatch(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} does not match the model: {what}")

    targets: dict[str, Tensor] = {}
    model_sd = model.state_dict(keep_vars=True)
    saved_model = {n for n in index if not n.startswith(OPTIM_PREFIX)}
    if saved_model != set(model_sd):
        missing, extra = sorted(set(model_sd) - saved_model), sorted(saved_model - set(model_sd))
        raise mismatch(f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in model_sd.items():
        sliced = id(t) in layout.sliced
        local = torch.empty_like(t.detach())
        full = [local.shape[0] * layout.ep, *local.shape[1:]] if sliced else list(local.shape)
        if _entry(index, name, path)[0] != full:
            raise mismatch(f"{name} is {index[name]['shape']} in the checkpoint, {full} here")
        targets[name] = layout.logical(local, sliced)
    optim_keys: dict[str, tuple[nn.Parameter, str]] = {}
    if optimizer is None:
        return targets, optim_keys
    params = dict(model.named_parameters())
    for name in index:
        if not name.startswith(OPTIM_PREFIX):
            continue
        pname, _, key = name[len(OPTIM_PREFIX):].rpartition("/")
        if pname not in params:
            raise mismatch(f"optimizer state for {pname!r}, which the model does not have")
        p = params[pname]
        shape, dtype = _entry(index, name, path)
        sliced = id(p) in layout.sliced and len(shape) >= 2 and shape[0] == p.shape[0] * layout.ep
        if _is_dtensor(p) and shape == list(p.shape):
            # An FSDP parameter's per-element state: a DTensor sharded as the parameter is (DCP reads its chunk).
            from torch.distributed.tensor import empty as dtensor_empty

            targets[name] = dtensor_empty(shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)
        else:
            local_shape = [p.shape[0], *shape[1:]] if sliced else shape
            local = torch.empty(local_shape, dtype=dtype, device=p.device)
            targets[name] = layout.logical(local, sliced)
        optim_keys[name] = (p, key)
    return targets, optim_keys


def _entry(index: dict[str, Any], name: str, path: Path) -> tuple[list[int], torch.dtype]:
    """The full shape and dtype the tensor index of ``state.json`` records for ``name``."""
    entry = index[name]
    shape = entry.get("shape") if isinstance(entry, dict) else None
    dtype = getattr(torch, str(entry.get("dtype")), None) if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape) \
            or not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"checkpoint {path}: {path / STATE_FILE} has a damaged index entry for {name!r}")
    return shape, dtype


def _is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP shard, or an expert slice as DCP sees it), without importing DTensor
    when nothing made one."""
    import sys

    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _as_held(t: Tensor, held: Tensor) -> Tensor:
    """A loaded tensor ``t`` in the form the model or optimizer holds it: a DTensor where it holds one (FSDP's
    shards), else this rank's local tensor (an expert slice was wrapped for DCP only)."""
    return t if _is_dtensor(held) else _local(t)


def load_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    parallel: ExpertParallel | None,
    *,
    verify: bool = True,
) -> dict[str, Any]:
    """Load the sharded checkpoint ``path`` into ``model`` (and ``optimizer``) as they are laid out here: expert
    banks sliced over ``parallel``'s ``ep`` group or full, on any ``(dp, ep)`` or on one process (``parallel`` None:
    no process group needed). Every file is verified first (``verify=False``: the caller just did, with
    :func:`verify_sharded`; not reading every shard twice). Returns the JSON state (the caller's values, ``step``,
    ``optimizer``, ``tensors``).

    Collective under ``parallel``. Raises :class:`CheckpointError` (one line) when a file is missing or damaged or
    the checkpoint does not fit the model; the model and optimizer are then untouched."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = Path(path)
    if verify:
        verify_sharded(path, parallel)
    layout = _layout(model, parallel)
    problem: str | None = None
    try:
        try:
            state = json.loads((path / STATE_FILE).read_bytes())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: {path / STATE_FILE} is unreadable ({_one_line(exc)})") from None
        if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict):
            raise CheckpointError(f"checkpoint {path}: {path / STATE_FILE} has no tensor index")
        targets, optim_keys = _targets(model, optimizer, layout, state["tensors"], path)
        order: list[str] = []
        if optimizer is not None:
            order = _optimizer_order(optimizer, model, state.get("optimizer"), path)
    except CheckpointError as exc:
        problem = str(exc)
    # Agreed before DCP's collectives: a rank that cannot load must not leave the others waiting in them.
    problem = next((p for p in _gather(parallel, problem) if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    reader = HuggingFaceStorageReader(str(path))
    try:
        with warnings.catch_warnings():
            # One process loads without a process group on purpose; DCP warns that it assumes so.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=reader, process_group=None if parallel is None else parallel.group,
                     no_dist=parallel is None)
    except BaseException as exc:  # DCP raises on every rank when one fails: no rank is left waiting
        if not _is_failure(exc):
            raise
        who, first = _rank_failures(exc)[0]
        where = "" if who is None or parallel is None else f" (rank {who})"
        raise CheckpointError(f"checkpoint {path} cannot be read{where}: {_one_line(first)}") from None
    # Every chunk has been read: only now are the model and the optimizer changed.
    held = model.state_dict(keep_vars=True)
    model.load_state_dict({n: _as_held(targets[n], t) for n, t in held.items()}, strict=True)
    if optimizer is not None:
        index_of = {n: i for i, n in enumerate(order)}
        names = {id(p): n for n, p in model.named_parameters()}
        meta = state["optimizer"]
        opt_state: dict[int, dict[str, Any]] = {}
        for name, (param, key) in optim_keys.items():
            opt_state.setdefault(index_of[names[id(param)]], {})[key] = _as_held(targets[name], param) \
                if targets[name].shape == param.shape else _local(targets[name])
        for pname, values in meta["scalars"].items():
            opt_state.setdefault(index_of[pname], {}).update(values)
        groups = [{**g, "params": [index_of[n] for n in g["params"]]} for g in meta["param_groups"]]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return state


def _optimizer_order(optimizer: torch.optim.Optimizer, model: nn.Module, meta: Any, path: Path) -> list[str]:
    """The optimizer's parameters by name, in its own order (the checkpoint names parameters, ``load_state_dict``
    numbers them); its parameter groups must hold the same parameters as the checkpoint's."""
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("scalars"), dict):
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    saved = [g.get("params") if isinstance(g, dict) else None for g in meta["param_groups"]]
    order = [n for g in groups for n in g]
    if saved != groups or not set(meta["scalars"]) <= set(order):
        raise CheckpointError(f"checkpoint {path}: its optimizer's parameter groups are not this optimizer's")
    return order
