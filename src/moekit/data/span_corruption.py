"""T5's span-corruption objective as resumable batch sources for encoder-decoder pre-training.

A raw window of ``tokens_length`` ids gets a noise mask of random spans (about 15 % of the tokens, spans of mean
length 3); each noise span is replaced in the encoder input by one sentinel id (``<extra_id_0>``, ``<extra_id_1>``,
... in order), and the decoder target is each sentinel followed by the span it replaced. An end-of-sequence id
closes both. This is the objective of T5 (Raffel et al. 2020, section 3.1.4) and of Switch Transformer's
pre-training; the algorithm follows T5's ``random_spans_noise_mask``, ``noise_span_to_unique_sentinel`` and
``compute_input_and_target_lengths`` (docs/DATA.md, "Span corruption (T5)").

Why the window length is derived: the number of noise tokens and spans is a pure function of the window length, so
:func:`span_corruption_lengths` picks the raw length whose corrupted inputs are exactly ``inputs_length`` ids, and
every batch is a dense ``[B, inputs_length]`` / ``[B, targets_length]`` pair with no padding (T5: 568 raw tokens ->
512 inputs, 114 targets).

Why each window's noise has its own generator: the mask of a training window is drawn from
``numpy.random.default_rng([seed, epoch, window])``, so a batch is a pure function of the resumable position
``{"epoch", "index"}`` (as for :class:`~moekit.data.batches.TokenBatches`) and resuming gives bit-identical batches,
masks included, with no generator state to save. Evaluation windows use ``default_rng([seed, window])``: the same
masks on every call and for every batch size.

Numpy arrays in, numpy arrays out for the two building blocks (one sequence at a time); the batch sources return
int64 tensors.

Shape legend: B batch rows, T raw window (``tokens_length``), I encoder inputs (``inputs_length``), L labels
(``targets_length``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from moekit.config import check_number
from moekit.data.batches import ShuffledOrder
from moekit.errors import ConfigError, MoekitError

__all__ = [
    "IGNORE_INDEX",
    "Seq2SeqBatch",
    "SpanCorruptionBatches",
    "SpanCorruptionEvalData",
    "random_spans_noise_mask",
    "span_corrupt",
    "span_corruption_lengths",
]

# Label value the loss ignores (torch's cross_entropy default): pads labels shorter than targets_length.
IGNORE_INDEX = -100


class Seq2SeqBatch(NamedTuple):
    """One batch of span-corruption examples. A tuple, so it unpacks as ``inputs, labels = batch`` exactly like the
    ``(inputs, targets)`` of the other batch sources (the trainer's ``BatchSource`` / ``EvalData`` protocols).

    - ``inputs``: ``[B, I]`` int64 encoder input ids (non-noise tokens, one sentinel per noise span, EOS).
    - ``labels``: ``[B, L]`` int64 decoder targets (each sentinel then its span, EOS); ``IGNORE_INDEX`` (-100)
      where a row is shorter than ``L`` (never with the lengths of :func:`span_corruption_lengths`).

    The decoder's inputs are the labels shifted right behind a start id (T5 uses its pad id); building them is
    the model's job, as with Hugging Face's T5.
    """

    inputs: Tensor
    labels: Tensor


# ---------------------------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: object, minimum: int) -> int:
    # numpy integers are fine here (window counts and seeds often come from arrays); bools are not.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_noise(noise_density: float, mean_noise_span_length: float) -> None:
    check_number("noise_density", noise_density, low=0, high=1, low_open=True, high_open=True)
    # Below 1 there could be more spans than noise tokens: no segmentation into non-empty spans exists.
    check_number("mean_noise_span_length", mean_noise_span_length, low=1)


def _check_sentinels(sentinel_ids: Sequence[int]) -> np.ndarray:
    ids = list(sentinel_ids)
    if not ids:
        raise ConfigError("sentinel_ids must hold at least one id")
    for i in ids:
        _check_int("sentinel_ids", i, 0)
    if len(set(ids)) != len(ids):
        raise ConfigError("sentinel_ids must be distinct ids")
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# the algorithm


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` of a window of ``length`` tokens (``length`` >= 2), with T5's
    clamps: at least one noise and one non-noise token, at least one span. Python's ``round`` rounds half to even,
    as ``tf.round`` does; in float64, as T5's length computation (its mask function multiplies in float32, which
    can differ only where ``length * density`` is within float32 error of a half)."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of ``num_items`` into ``num_segments`` positive parts: cut the
    ``num_items - 1`` gaps between items at ``num_segments - 1`` distinct places (T5 shuffles the same cut
    indicators; the distribution is the same)."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask: a bool array of ``length`` with ``round(length * noise_density)`` noise tokens (True) in
    ``max(1, round(noise / mean_noise_span_length))`` spans.

    The noise tokens and the non-noise tokens are each cut into that many non-empty spans at random, and the spans
    are interleaved starting with non-noise (so the mask starts with non-noise and ends with noise). Deterministic
    given ``rng``: the noise cuts are drawn first, then the non-noise cuts. Windows shorter than 2 are masked as if
    of length 2 and cut back (T5's rule), so a 1-token window is all non-noise.
    """
    length = _check_int("length", length, 0)
    _check_noise(noise_density, mean_noise_span_length)
    if length == 0:
        return np.zeros(0, dtype=bool)
    n = max(length, 2)
    num_noise, num_spans = _noise_counts(n, noise_density, mean_noise_span_length)
    if n - num_noise < num_spans:
        raise ConfigError(
            f"noise_density={noise_density} leaves {n - num_noise} non-noise tokens of a {n}-token window, fewer"
            f" than its {num_spans} noise spans; use a lower noise_density or a longer mean_noise_span_length"
        )
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(n - num_noise, num_spans, rng)
    span_lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # keep, noise, keep, noise, ...
    mask = np.repeat(np.tile(np.array([False, True]), num_spans), span_lengths)
    return mask[:length]


def span_corrupt(
    tokens: np.ndarray | Sequence[int],
    noise_mask: np.ndarray | Sequence[bool],
    sentinel_ids: Sequence[int],
    *,
    eos_id: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``, int64: each noise span of ``tokens`` replaced in the inputs by one sentinel (span i
    by ``sentinel_ids[i]``), and the targets each sentinel followed by the span it replaced; ``eos_id`` appended to
    both (None: nothing appended).

    For T5's masks (starting with non-noise, ending with noise) this is exactly T5's pair; any other mask gives
    the same sentence-level meaning (T5 would start the targets with an unmarked span, or end them with a sentinel
    for a trailing non-noise span).
    """
    tokens_T = np.asarray(tokens)
    mask_T = np.asarray(noise_mask)
    # (An empty list arrives as float64: only a non-empty array must have an integer / bool dtype.)
    if tokens_T.ndim != 1 or (tokens_T.size and not np.issubdtype(tokens_T.dtype, np.integer)):
        raise ConfigError(f"tokens must be a 1-D array of integer ids, got shape {tokens_T.shape} {tokens_T.dtype}")
    if mask_T.shape != tokens_T.shape or (mask_T.size and mask_T.dtype != np.bool_):
        raise ConfigError(
            f"noise_mask must be a bool array of the tokens' shape {tokens_T.shape}, got {mask_T.shape} {mask_T.dtype}"
        )
    sentinels = _check_sentinels(sentinel_ids)
    eos = None if eos_id is None else _check_int("eos_id", eos_id, 0)
    num_spans = int((mask_T & ~np.concatenate([[False], mask_T[:-1]])).sum()) if mask_T.size else 0
    if num_spans > len(sentinels):
        raise ConfigError(f"the noise mask has {num_spans} spans but sentinel_ids holds only {len(sentinels)} ids")
    return _corrupt(tokens_T.astype(np.int64), mask_T.astype(bool), sentinels, eos)


def _corrupt(
    tokens_T: np.ndarray, mask_T: np.ndarray, sentinels: np.ndarray, eos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`span_corrupt` on checked arrays (int64 tokens, bool mask, enough int64 sentinels)."""
    starts_T = mask_T & ~np.concatenate([[False], mask_T[:-1]])  # the first token of each noise span
    num_spans = int(starts_T.sum())
    span_T = np.cumsum(starts_T) - 1  # span number of each noise token (-1 before the first span)
    # Inputs: every non-noise token, and the span's sentinel in place of its first token; the rest of a span goes.
    inputs = np.where(starts_T, sentinels[np.maximum(span_T, 0)], tokens_T)[~mask_T | starts_T]
    # Targets: the noise tokens in order, with span i's sentinel inserted before its first token.
    targets = np.insert(tokens_T[mask_T], np.flatnonzero(starts_T[mask_T]), sentinels[:num_spans])
    if eos_id is not None:
        eos = np.array([eos_id], dtype=np.int64)
        inputs, targets = np.concatenate([inputs, eos]), np.concatenate([targets, eos])
    return inputs.astype(np.int64), targets.astype(np.int64)


def _corrupted_lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """The lengths of the inputs and targets that a window of ``tokens_length`` (>= 2) corrupts to, EOS included:
    non-noise + one sentinel per span + EOS, and noise + one sentinel per span + EOS."""
    num_noise, num_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``(tokens_length, targets_length)``: the longest raw window whose corrupted inputs (EOS included) are exactly
    ``inputs_length`` ids, and the length of its targets (EOS included). T5's ``compute_input_and_target_lengths``:
    512 -> (568, 114) at density 0.15 and mean span 3.

    At density 0.5 T5 shortens the window by one token when the targets would be longer than the inputs (so both
    have the round length); this does too, but only when the inputs stay exactly ``inputs_length``.
    """
    inputs_length = _check_int("inputs_length", inputs_length, 2)
    _check_noise(noise_density, mean_noise_span_length)
    # Inputs are never longer than the window + 1 (at most one sentinel per noise token), so start one below.
    tokens_length = max(inputs_length - 1, 2)
    while _corrupted_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    got_inputs, targets_length = _corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        shorter = _corrupted_lengths(tokens_length - 1, noise_density, mean_noise_span_length)
        if shorter[0] == inputs_length:
            tokens_length, targets_length = tokens_length - 1, shorter[1]
    num_noise, num_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)
    if got_inputs != inputs_length or tokens_length - num_noise < num_spans:
        raise ConfigError(
            f"inputs_length={inputs_length} cannot be reached exactly by span corruption at noise_density="
            f"{noise_density}, mean_noise_span_length={mean_noise_span_length}; use a longer inputs_length"
        )
    return tokens_length, targets_length


# ---------------------------------------------------------------------------------------------------------------
# batch sources


class _Corruptor:
    """The checked setup the training and evaluation sources share: lengths, sentinels, and the corruption of a
    batch of windows into dense tensors."""

    def __init__(
        self,
        tokens: np.ndarray,
        inputs_length: int,
        sentinel_ids: Sequence[int],
        eos_id: int,
        noise_density: float,
        mean_noise_span_length: float,
        split: str,
    ) -> None:
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise ConfigError(f"tokens must be a 1-D integer array, got shape {self.tokens.shape} {self.tokens.dtype}")
        self.tokens_length, self.targets_length = span_corruption_lengths(
            inputs_length, noise_density, mean_noise_span_length
        )
        self.inputs_length = int(inputs_length)
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.sentinels = _check_sentinels(sentinel_ids)
        self.eos_id = _check_int("eos_id", eos_id, 0)
        if self.eos_id in set(self.sentinels.tolist()):
            raise ConfigError(f"eos_id={eos_id} is one of the sentinel_ids")
        num_spans = _noise_counts(self.tokens_length, noise_density, mean_noise_span_length)[1]
        if num_spans > len(self.sentinels):
            raise ConfigError(
                f"a {self.tokens_length}-token window has {num_spans} noise spans but sentinel_ids holds only"
                f" {len(self.sentinels)} ids"
            )
        # A sentinel already in the text would make a target ambiguous (and means the ids are not sentinels).
        if self.tokens.size:
            table = np.zeros(max(int(self.tokens.max()), int(self.sentinels.max())) + 1, dtype=bool)
            table[self.sentinels] = True
            if self.tokens.min() >= 0 and table[self.tokens].any():
                found = sorted(set(self.tokens[table[self.tokens]].tolist()))[:5]
                raise MoekitError(
                    f"the {split} tokens contain sentinel ids {found}: sentinel_ids must be ids the tokenizer never"
                    " produces from text (moekit.lab.data.tokenizer.sentinel_ids)"
                )
        self.num_windows = len(self.tokens) // self.tokens_length

    def batch(self, windows: np.ndarray, rng_keys: list[list[int]]) -> Seq2SeqBatch:
        """Windows ``windows`` (window numbers), window i corrupted with ``default_rng(rng_keys[i])``."""
        B, T = len(windows), self.tokens_length
        inputs_BI = np.empty((B, self.inputs_length), dtype=np.int64)
        labels_BL = np.full((B, self.targets_length), IGNORE_INDEX, dtype=np.int64)
        for row, (w, key) in enumerate(zip(windows.tolist(), rng_keys, strict=True)):
            rng = np.random.default_rng(key)
            mask_T = random_spans_noise_mask(T, self.noise_density, self.mean_noise_span_length, rng)
            window_T = self.tokens[w * T : (w + 1) * T].astype(np.int64)
            inputs, targets = _corrupt(window_T, mask_T, self.sentinels, self.eos_id)
            # The lengths fix the inputs exactly (the noise counts depend on T only); a mismatch is a bug here.
            assert len(inputs) == self.inputs_length and len(targets) <= self.targets_length
            inputs_BI[row] = inputs
            labels_BL[row, : len(targets)] = targets
        return Seq2SeqBatch(torch.from_numpy(inputs_BI), torch.from_numpy(labels_BL))


class SpanCorruptionBatches(ShuffledOrder):
    """Endless shuffled span-corruption batches :class:`Seq2SeqBatch` ``(inputs [B, inputs_length], labels [B,
    targets_length])`` (int64) with a resumable position: the trainer's ``BatchSource``.

    The training tokens are cut into non-overlapping raw windows of ``tokens_length`` (from
    :func:`span_corruption_lengths`); each epoch visits them in a fresh permutation from
    ``default_rng([seed, epoch])`` and drops the ragged tail (:class:`~moekit.data.batches.ShuffledOrder`), and
    window ``w`` of epoch ``e`` is corrupted with ``default_rng([seed, e, w])``. So ``{"epoch", "index"}`` is all a
    checkpoint needs, and a window gets a fresh mask each epoch. Rows are not split by rank here: the trainer
    slices each batch's rows for its rank, as for the token batches.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        inputs_length: int,
        seed: int,
        sentinel_ids: Sequence[int],
        eos_id: int,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
    ) -> None:
        batch_size = _check_int("batch_size", batch_size, 1)
        seed = _check_int("seed", seed, 0)
        self._corruptor = _Corruptor(
            tokens, inputs_length, sentinel_ids, eos_id, noise_density, mean_noise_span_length, "training"
        )
        c = self._corruptor
        self.tokens = c.tokens
        self.inputs_length, self.targets_length, self.tokens_length = c.inputs_length, c.targets_length, c.tokens_length
        self.num_windows = c.num_windows
        if self.num_windows < batch_size:
            raise MoekitError(
                f"the training split has {len(c.tokens)} tokens: {self.num_windows} windows of {c.tokens_length},"
                f" fewer than batch_size={batch_size}; use more text or a smaller batch_size / inputs_length"
            )
        super().__init__(self.num_windows, batch_size, seed)

    def next_batch(self) -> Seq2SeqBatch:
        windows = self.next_indices()
        # next_indices has moved to the epoch these windows belong to.
        keys = [[self.seed, self.epoch, int(w)] for w in windows]
        return self._corruptor.batch(windows, keys)


class SpanCorruptionEvalData:
    """A held-out split as the trainer's ``EvalData``: consecutive raw windows of ``tokens_length`` covering the
    split (its last ``len % tokens_length`` tokens, less than one window, are left out), window ``w`` corrupted
    with ``default_rng([seed, w])``, visited in order in batches of :class:`Seq2SeqBatch` (the last may be
    smaller). The same examples on every call and for any batch size. Checked on construction: a split shorter
    than one window is found before training.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        inputs_length: int,
        sentinel_ids: Sequence[int],
        eos_id: int,
        seed: int = 0,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
    ) -> None:
        self.seed = _check_int("seed", seed, 0)
        self._corruptor = _Corruptor(
            tokens, inputs_length, sentinel_ids, eos_id, noise_density, mean_noise_span_length, "validation"
        )
        c = self._corruptor
        self.tokens = c.tokens
        self.inputs_length, self.targets_length, self.tokens_length = c.inputs_length, c.targets_length, c.tokens_length
        self.num_windows = c.num_windows
        if self.num_windows == 0:
            raise MoekitError(
                f"the validation split has {len(c.tokens)} tokens, fewer than one span-corruption window of"
                f" {c.tokens_length} (inputs_length={inputs_length}); use more text, a larger data.val_fraction or"
                " a smaller inputs_length"
            )

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[Seq2SeqBatch]:
        """The fixed batches in order: all windows, or the first ``max_batches * batch_size``. Arguments are
        checked on the call, not at the first batch."""
        batch_size = _check_int("batch_size", batch_size, 1)
        n = self.num_windows
        if max_batches is not None:
            n = min(n, _check_int("max_batches", max_batches, 1) * batch_size)
        return self._batches(batch_size, n)

    def _batches(self, batch_size: int, n: int) -> Iterator[Seq2SeqBatch]:
        windows = np.arange(n, dtype=np.int64)
        for i in range(0, n, batch_size):
            chunk = windows[i : i + batch_size]
            yield self._corruptor.batch(chunk, [[self.seed, int(w)] for w in chunk])
