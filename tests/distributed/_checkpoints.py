"""Checkpoint helpers of the tests: read a checkpoint's model weights in the single-process layout whatever its
format, and fill the disk under DCP's writer.

Distributed runs write sharded checkpoints (one file per writing rank, each holding chunks of the full tensors at
the offsets its safetensors header records); one process writes ``model.safetensors``. The tests compare weights
across runs of either kind, so they read both the same way. Named uniquely (not conftest) and imported explicitly.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors (parameters and buffers, not optimizer state) of checkpoint directory ``path``: a
    single-file checkpoint's ``model.safetensors``, or a sharded one's chunks put back together by their offsets.
    Every element of every tensor must come from some chunk (a gap in a floating-point tensor stays NaN and fails
    any comparison)."""
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    index = json.loads((path / "state.json").read_text())["tensors"]
    out = {}
    for name, entry in index.items():
        if not name.startswith("optim/"):
            dtype = getattr(torch, entry["dtype"])
            out[name] = torch.full(entry["shape"], float("nan") if dtype.is_floating_point else 0, dtype=dtype)
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in f.keys():
                if key in out:
                    chunk = f.get_tensor(key)
                    at = offsets[key]["saved_offsets"]
                    out[key][tuple(slice(o, o + n) for o, n in zip(at, chunk.shape, strict=True))] = chunk
    return out


class _FullDiskStream:
    """A file whose first write gets half its bytes onto the disk, then finds the disk full."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        self._f.write(bytes(data[: len(data) // 2]))
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device", self._f.name)

    def __getattr__(self, name: str):
        return getattr(self._f, name)


@contextlib.contextmanager
def full_disk() -> Iterator[None]:
    """While active, every shard file DCP's file-system writer opens in this process runs out of space mid-write
    (the real write path: DCP wraps the error in its ``CheckpointException`` and shares it with every rank)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with open(path, mode) as f:
            yield _FullDiskStream(f)

    FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        FileSystem.create_stream = real
