"""Deterministic batches of token windows whose position is a small JSON-able state (saved in checkpoints).

Training windows are the non-overlapping ``seq_len + 1``-token slices of the training tokens, visited in a fresh
permutation each epoch; the permutation is a pure function of ``(seed, epoch)``, so ``{"epoch", "index"}`` is all a
checkpoint needs to continue exactly. Validation windows are fixed and visited in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from moekit.errors import MoekitError

__all__ = ["ShuffledOrder", "TokenBatches", "TokenEvalData", "eval_windows", "unigram_cross_entropy"]


def _windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)


def _window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    idx_BT = starts[:, None] + np.arange(seq_len + 1)[None, :]
    win = torch.from_numpy(tokens[idx_BT].astype(np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


class ShuffledOrder:
    """A resumable visiting order over ``num_items`` examples in batches of ``batch_size``: a fresh permutation
    each epoch, a pure function of ``(seed, epoch)``, with the ragged tail of an epoch dropped (every batch is
    full). The position is ``{"epoch", "index"}``, all a checkpoint needs. Shared by the token and image batches.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        return self._perm

    def _advance(self) -> int:
        """Move to the next batch (into the next epoch when this one has no full batch left: the ragged tail is
        dropped); its start within the epoch's permutation."""
        if self.index + self.batch_size > self.num_items:
            self.epoch += 1
            self.index = 0
            self._perm = None
        start = self.index
        self.index += self.batch_size
        return start

    def next_indices(self) -> np.ndarray:
        """The item indices of the next batch."""
        start = self._advance()
        return self._permutation()[start : start + self.batch_size]

    def skip(self, batches: int) -> None:
        """Move the position ``batches`` batches on, exactly as that many :meth:`next_indices` calls would (epoch
        ends included), without drawing them: a run that should start further into the same order (a distillation
        student on the windows after its teacher's last batch) skips the batches before."""
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise MoekitError(f"batches to skip must be a non-negative integer, got {batches!r}")
        for _ in range(batches):
            self._advance()

    def batches_per_epoch(self) -> int:
        """Full batches in one epoch (the ragged tail is dropped)."""
        return self.num_items // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._perm = None


class TokenBatches(ShuffledOrder):
    """Endless shuffled batches ``(inputs_BT, targets_BT)`` (int64) of token windows with a resumable position."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_windows = _windows(tokens, seq_len)
        if self.num_windows < batch_size:
            raise MoekitError(
                f"the training split has {len(tokens)} tokens: {self.num_windows} windows of {seq_len + 1},"
                f" fewer than train.batch_size={batch_size}; use more text or a smaller batch_size / seq_len"
            )
        super().__init__(self.num_windows, batch_size, seed)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        starts = self.next_indices().astype(np.int64) * self.seq_len
        return _window_batch(self.tokens, starts, self.seq_len)


def eval_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """The fixed validation batches, in order (the last one may be smaller)."""
    n = _windows(tokens, seq_len)
    if n == 0:
        raise MoekitError(
            f"the validation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}"
        )
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    starts = np.arange(n, dtype=np.int64) * seq_len
    for i in range(0, n, batch_size):
        yield _window_batch(tokens, starts[i : i + batch_size], seq_len)


class TokenEvalData:
    """Held-out token ids as the trainer's evaluation data: the fixed windows of ``eval_windows``.

    Checked on construction (a split shorter than one window is found before training, not at the first
    evaluation after minutes of it)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise MoekitError(
                f"the validation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}; use"
                " more text, a larger data.val_fraction or a smaller data.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        return eval_windows(self.tokens, batch_size, self.seq_len, max_batches)


def unigram_cross_entropy(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    vocab_size: int,
    seq_len: int,
    max_windows: int | None = None,
) -> float:
    """Cross-entropy (nats) of the validation targets under the training unigram distribution (add-one
    smoothed):
    the loss a model that ignores context would reach, to judge whether a run learned anything beyond it."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    n = _windows(val_tokens, seq_len)
    if max_windows is not None:
        n = min(n, max_windows)
    targets = val_tokens[1 : n * seq_len + 1]
    return float(-logp[targets].mean())
