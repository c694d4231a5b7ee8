"""Load a trained run (config, data, tokenizer, model with its newest checkpoint) for the analysis and
distillation tools.

Stricter than ``moekit eval``: an analysis or a distillation of a silently older model would be misleading, so a
newest checkpoint that fails its checksum is an error unless ``fallback=True`` (then the previous valid one is used
and ``warn`` is told which).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import MoekitError
from moekit.models import TransformerLM
from moekit.training import checkpoint as ckpt
from moekit.training.run import PreparedData, load_run
from moekit.training.run_config import RunConfig

__all__ = ["LoadedRun", "load_trained_run"]


@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    data: PreparedData
    model: TransformerLM
    checkpoint: Path
    step: int


def load_trained_run(
    run_dir: str | Path, *, fallback: bool = False, warn: Callable[[str], None] | None = None
) -> LoadedRun:
    """The run in ``run_dir`` with the weights of its newest checkpoint (in eval mode)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MoekitError(f"run directory {str(run_dir)!r} does not exist")
    run_config, data, model = load_run(run_dir)
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
