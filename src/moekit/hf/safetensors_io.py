"""Reading and writing Hugging Face ``save_pretrained`` weight files without pickle and without holding the file
in memory twice.

A checkpoint is one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Tensors are read one
at a time with plain file reads into freshly allocated tensors (no memory map: mapped pages count in the process's
resident memory while they stay cached, which would double the peak of an import). ``pytorch_model.bin`` and
other pickle checkpoints are refused, never opened.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.atomic import atomic_path
from moekit.errors import MoekitError

__all__ = ["SafetensorsReader", "write_checkpoint", "write_sharded"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5", "flax_model.msgpack")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """The tensors of a ``save_pretrained`` directory: names, shapes and one tensor at a time.

    Raises a one-line :class:`MoekitError` for a directory with no safetensors (naming a pickle checkpoint when
    that is what it holds), a damaged header, an index naming a missing shard, or a tensor whose bytes run past its
    file.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = d = Path(directory)
        if not d.is_dir():
            raise MoekitError(f"{d} is not a directory")
        index, single = d / INDEX_FILE, d / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise MoekitError(f"{index}: not a safetensors index ({exc})") from None
        elif single.is_file():
            files = [SINGLE_FILE]
        else:
            pickles = [p for p in PICKLE_FILES if (d / p).exists()]
            if pickles:
                raise MoekitError(
                    f"{d} holds {pickles[0]}, a pickle checkpoint: moekit never unpickles files (they can run code); "
                    "convert it to safetensors with the tool that wrote it"
                )
            raise MoekitError(f"{d} has no {SINGLE_FILE} or {INDEX_FILE}")
        self._where: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for name in files:
            path = d / name
            if not path.is_file():
                raise MoekitError(f"{index} names shard {name}, which is missing from {d}")
            for key, entry in self._header(path).items():
                self._where[key] = (path, *entry)

    @staticmethod
    def _header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise MoekitError(f"{path} is not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise MoekitError(f"{path} is not a safetensors file (header length {n} past the end of the file)")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError) as exc:
                raise MoekitError(f"{path}: damaged safetensors header ({exc})") from None
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise MoekitError(f"{path}: damaged safetensors header entry for {key!r}") from None
            if dtype not in _DTYPES:
                raise MoekitError(f"{path}: tensor {key!r} has dtype {dtype}, which moekit does not read")
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
            if end - start != nbytes or 8 + n + end > size:
                raise MoekitError(f"{path}: tensor {key!r} is truncated or its header is inconsistent")
            out[key] = (dtype, shape, 8 + n + start, nbytes)
        return out

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> list[int]:
        return self._where[key][2]

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``, read from its file into new memory, or straight into ``out`` (returned) when ``out``
        is a contiguous tensor of the same dtype and shape."""
        try:
            path, dtype, shape, offset, nbytes = self._where[key]
        except KeyError:
            raise MoekitError(f"{self.directory}: the checkpoint has no tensor {key!r}") from None
        direct = (out is not None and out.dtype == _DTYPES[dtype] and list(out.shape) == shape
                  and out.is_contiguous() and out.device.type == "cpu")
        out = out if direct else torch.empty(shape, dtype=_DTYPES[dtype])
        if nbytes:
            buf = out.detach().reshape(-1).view(torch.uint8).numpy()
            with path.open("rb") as f:
                f.seek(offset)
                if f.readinto(memoryview(buf)) != nbytes:
                    raise MoekitError(f"{path}: tensor {key!r} is truncated")
        return out


def write_sharded(
    tensors: Iterator[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write ``(name, tensor)`` pairs as ``model.safetensors`` or, past ``max_shard_bytes``, as numbered shards with
    ``model.safetensors.index.json`` (Hugging Face's layout). Each file is written atomically; returns the names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.contiguous()
        sizes[-1] += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        with atomic_path(directory / SINGLE_FILE) as tmp:
            save_file(shards[0], str(tmp), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        with atomic_path(directory / name) as tmp:
            save_file(shard, str(tmp), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    with atomic_path(directory / INDEX_FILE) as tmp:
        tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [*names, INDEX_FILE]


def write_checkpoint(
    directory: str | Path, tensors: Iterator[tuple[str, torch.Tensor]], config: dict, max_shard_bytes: int
) -> None:
    """A ``save_pretrained`` directory: the tensors (float32, on the CPU; sharded past ``max_shard_bytes``) and then
    ``config.json``, each file written atomically; ``directory`` is created if needed."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        write_sharded(((name, t.detach().to("cpu", torch.float32)) for name, t in tensors), out, max_shard_bytes)
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
