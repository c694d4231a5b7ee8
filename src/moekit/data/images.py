"""Image batches for the trainer: resumable shuffled training batches and the fixed evaluation batches of an image
classification split held in memory (numpy arrays or tensors). The data set readers (IDX files, Fashion-MNIST, the
digits) are in :mod:`moekit.lab.data.images`.

Batches follow :class:`moekit.data.batches.TokenBatches`: the permutation of an epoch is a pure function of
``(seed, epoch)``, so ``{"epoch", "index"}`` is all a checkpoint needs to continue exactly.

Shape legend: N examples, B batch, C channels, H height, W width.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from moekit.data.batches import ShuffledOrder
from moekit.errors import MoekitError

__all__ = ["ImageBatches", "ImageEvalData", "image_eval_batches"]


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _batch(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.ascontiguousarray(images[idx])), torch.from_numpy(labels[idx].astype(np.int64))


class ImageBatches(ShuffledOrder):
    """Endless shuffled batches ``(images_B..., labels_B)`` (float32 images as stored, int64 labels) with a
    resumable position.

    Each epoch visits a fresh permutation drawn from ``np.random.default_rng([seed, epoch])`` and drops its ragged
    tail (the last ``N % batch_size`` examples of the permutation), so every batch has ``batch_size`` examples
    (:class:`moekit.data.batches.ShuffledOrder`, as the token batches).
    """

    # What the trainer counts per example in its progress line (its metric stays ``tokens_per_s``).
    unit = "images"

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor, batch_size: int, seed: int) -> None:
        self.images = _as_numpy(images)
        self.labels = _as_numpy(labels)
        if len(self.images) != len(self.labels):
            raise MoekitError(f"{len(self.images)} images but {len(self.labels)} labels")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MoekitError(f"train.batch_size must be a positive integer, got {batch_size!r}")
        self.num_examples = len(self.images)
        if self.num_examples < batch_size:
            raise MoekitError(
                f"the training split has {self.num_examples} images, fewer than train.batch_size={batch_size};"
                " use a smaller batch_size"
            )
        super().__init__(self.num_examples, batch_size, seed)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        return _batch(self.images, self.labels, self.next_indices())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()


def image_eval_batches(
    images: np.ndarray | Tensor, labels: np.ndarray | Tensor, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """The fixed evaluation batches, in order (the last one may be smaller); at most ``max_batches`` of them."""
    x, y = _as_numpy(images), _as_numpy(labels)
    if len(x) == 0:
        raise MoekitError("the evaluation split holds no images")
    n = len(x) if max_batches is None else min(len(x), max_batches * batch_size)
    for i in range(0, n, batch_size):
        idx = np.arange(i, min(i + batch_size, n))
        yield _batch(x, y, idx)


class ImageEvalData:
    """The fixed test images as the trainer's evaluation data (as ``TokenEvalData`` is for token ids)."""

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> None:
        self.images = images
        self.labels = labels

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        return image_eval_batches(self.images, self.labels, batch_size, max_batches)
