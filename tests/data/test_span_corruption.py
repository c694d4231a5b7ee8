"""T5 span corruption: the noise mask, the corruption of one sequence, the lengths (T5's golden 512 -> 568 / 114),
and the resumable training batches and fixed evaluation batches built on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.data.span_corruption import (
    IGNORE_INDEX,
    Seq2SeqBatch,
    SpanCorruptionBatches,
    SpanCorruptionEvalData,
    random_spans_noise_mask,
    span_corrupt,
    span_corruption_lengths,
)
from moekit.errors import MoekitError

SENTINELS = list(range(1000, 1100))  # 100 sentinels, as T5; ids above every ordinary token below
EOS = 1


def _spans(mask: np.ndarray) -> list[tuple[bool, int]]:
    """The runs of a mask: (is_noise, length) in order."""
    runs: list[tuple[bool, int]] = []
    for v in mask.tolist():
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


def _uncorrupt(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """The raw window back from a corrupted pair (both ending in EOS): each sentinel in the inputs replaced by the
    tokens that follow it in the targets."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in sentinels else [t])
    return out


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 1000, n).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# one sequence


def test_span_corrupt_hand_made_golden():
    tokens = np.arange(10, 20)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    # tokens  10 11 [12 13] 14 15 16 [17] 18 19: two noise spans, [12 13] -> sentinel 0 (100), [17] -> sentinel 1
    # inputs:  10 11 100 14 15 16 101 18 19 EOS
    # targets: 100 12 13 101 17 EOS
    inputs, targets = span_corrupt(tokens, mask, [100, 101, 102], eos_id=EOS)
    assert inputs.tolist() == [10, 11, 100, 14, 15, 16, 101, 18, 19, EOS]
    assert targets.tolist() == [100, 12, 13, 101, 17, EOS]
    assert inputs.dtype == np.int64 and targets.dtype == np.int64
    # T5's shape of mask (starts with non-noise, ends with noise), no EOS:
    # 5 6 [7] 8 [9 10] -> inputs 5 6 100 8 101; targets 100 7 101 9 10
    mask = [False, False, True, False, True, True]
    inputs, targets = span_corrupt([5, 6, 7, 8, 9, 10], mask, [100, 101], eos_id=None)
    assert inputs.tolist() == [5, 6, 100, 8, 101] and targets.tolist() == [100, 7, 101, 9, 10]
    # A mask starting with noise: [5 6] 7 -> inputs 100 7 EOS; targets 100 5 6 EOS
    inputs, targets = span_corrupt([5, 6, 7], [True, True, False], [100], eos_id=EOS)
    assert inputs.tolist() == [100, 7, EOS] and targets.tolist() == [100, 5, 6, EOS]
    # No noise: the inputs are the tokens, the targets only EOS.
    inputs, targets = span_corrupt([5, 6], [False, False], [100], eos_id=EOS)
    assert inputs.tolist() == [5, 6, EOS] and targets.tolist() == [EOS]


def test_span_corrupt_refuses_bad_arguments():
    with pytest.raises(ValueError, match="sentinel_ids holds only 1"):
        span_corrupt([1, 2, 3], [True, False, True], [100], eos_id=EOS)
    with pytest.raises(ValueError, match="noise_mask"):
        span_corrupt([1, 2, 3], [True, False], [100], eos_id=EOS)
    with pytest.raises(ValueError, match="sentinel_ids must be distinct"):
        span_corrupt([1, 2, 3], [True, False, False], [100, 100], eos_id=EOS)
    with pytest.raises(ValueError, match="eos_id"):
        span_corrupt([1, 2, 3], [True, False, False], [100], eos_id=-1)


def test_noise_mask_counts_spans_and_shape():
    for length in (2, 3, 10, 57, 114, 568):
        for seed in range(30):
            mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
            assert mask.shape == (length,) and mask.dtype == bool
            num_noise = min(max(round(length * 0.15), 1), length - 1)
            num_spans = max(1, round(num_noise / 3.0))
            runs = _spans(mask)
            assert int(mask.sum()) == num_noise
            assert sum(1 for noise, _ in runs if noise) == num_spans
            assert not runs[0][0] and runs[-1][0]  # starts with non-noise, ends with noise
    assert random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0)).tolist() == [False]
    assert random_spans_noise_mask(0, 0.15, 3.0, np.random.default_rng(0)).shape == (0,)


def test_noise_mask_is_deterministic_and_span_lengths_average_three():
    a = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(7))
    assert np.array_equal(a, random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(7)))
    assert not np.array_equal(a, random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(8)))
    lengths = []
    for seed in range(300):
        mask = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(seed))
        lengths += [n for noise, n in _spans(mask) if noise]
    # 85 noise tokens in 28 spans per window: mean 3.04; the spans vary (a random composition, not all 3)
    assert np.mean(lengths) == pytest.approx(3.0, abs=0.1)
    assert min(lengths) == 1 and max(lengths) >= 10
    # Random non-noise segmentation: the noise lands everywhere but the very first token.
    hits = sum(random_spans_noise_mask(40, 0.15, 3.0, np.random.default_rng(s)) for s in range(400))
    assert hits[0] == 0 and (hits[1:] > 0).all()


def test_noise_mask_refuses_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="noise_density"):
        random_spans_noise_mask(10, 1.5, 3.0, rng)
    with pytest.raises(ValueError, match="mean_noise_span_length"):
        random_spans_noise_mask(10, 0.15, 0.5, rng)
    with pytest.raises(ValueError, match="length"):
        random_spans_noise_mask(-1, 0.15, 3.0, rng)
    with pytest.raises(ValueError, match="noise_density=0.9"):  # 1 non-noise token for 3 spans
        random_spans_noise_mask(10, 0.9, 3.0, rng)


# ---------------------------------------------------------------------------------------------------------------
# lengths


def test_lengths_t5_golden():
    # T5 (compute_input_and_target_lengths): 568 raw tokens -> 85 noise in 28 spans -> inputs 483 + 28 + EOS = 512,
    # targets 85 + 28 + EOS = 114.
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    assert span_corruption_lengths(512) == (568, 114)
    # Density 0.5: 767 tokens would give 384 noise (half to even) and targets of 513 > 512; T5 drops one token:
    # 766 -> 383 noise, 128 spans -> inputs 383 + 128 + 1 = 512, targets 512.
    assert span_corruption_lengths(512, 0.5, 3.0) == (766, 512)
    with pytest.raises(ValueError, match="inputs_length"):
        span_corruption_lengths(2)


@pytest.mark.parametrize(("density", "mean"), [(0.15, 3.0), (0.5, 3.0), (0.3, 8.0), (0.15, 1.0)])
def test_lengths_give_exact_inputs_for_any_seed(density, mean):
    for inputs_length in (16, 64, 100, 512):
        tokens_length, targets_length = span_corruption_lengths(inputs_length, density, mean)
        window = np.arange(tokens_length)
        for seed in range(20):
            mask = random_spans_noise_mask(tokens_length, density, mean, np.random.default_rng(seed))
            inputs, targets = span_corrupt(window, mask, list(range(10_000, 10_000 + tokens_length)), eos_id=EOS)
            assert (len(inputs), len(targets)) == (inputs_length, targets_length)
        if density != 0.5:  # the longest such window: one more token would not fit (0.5: T5 drops one more)
            mask = random_spans_noise_mask(tokens_length + 1, density, mean, np.random.default_rng(0))
            longer, _ = span_corrupt(np.arange(tokens_length + 1), mask, range(10_000, 11_000), eos_id=EOS)
            assert len(longer) == inputs_length + 1


# ---------------------------------------------------------------------------------------------------------------
# training batches


def _batches(tokens: np.ndarray, seed: int = 0, batch_size: int = 4, inputs_length: int = 64) -> SpanCorruptionBatches:
    return SpanCorruptionBatches(tokens, batch_size, inputs_length, seed, SENTINELS, EOS)


def test_batches_shapes_and_content():
    tokens = _tokens(3000)
    b = _batches(tokens)
    assert (b.tokens_length, b.targets_length) == span_corruption_lengths(64)
    batch = b.next_batch()
    assert isinstance(batch, Seq2SeqBatch)
    inputs, labels = batch  # unpacks like the (inputs, targets) of the other batch sources
    assert inputs.shape == (4, 64) and labels.shape == (4, b.targets_length)
    assert inputs.dtype == torch.int64 and labels.dtype == torch.int64
    assert not bool((labels == IGNORE_INDEX).any())  # the lengths are exact: no padding
    T = b.tokens_length
    for x, y in zip(inputs.tolist(), labels.tolist(), strict=True):
        assert y[0] == SENTINELS[0] and x.count(SENTINELS[0]) == 1  # sentinels in order, each once
        # the pair corrupts one of the non-overlapping raw windows of the token array
        window = _uncorrupt(x, y, SENTINELS)
        assert [w for w in range(b.num_windows) if tokens[w * T : (w + 1) * T].tolist() == window] != []


def test_batches_deterministic_per_seed_and_differ_across_seeds():
    tokens = _tokens(3000)
    a, b, c = _batches(tokens, seed=3), _batches(tokens, seed=3), _batches(tokens, seed=4)
    for _ in range(3):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)
        assert not torch.equal(x.inputs, z.inputs)


def test_same_window_gets_a_fresh_mask_each_epoch():
    tokens = _tokens(600)  # 64 inputs <- 70 raw tokens: 8 windows, one batch of 8 per epoch
    b = SpanCorruptionBatches(tokens, 8, 64, 0, SENTINELS, EOS)
    e0, e1 = b.next_batch(), b.next_batch()
    assert b.state_dict()["epoch"] == 1

    def decode(batch: Seq2SeqBatch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        rows = zip(batch.inputs.tolist(), batch.labels.tolist(), strict=True)
        return sorted((tuple(_uncorrupt(x, y, SENTINELS)), tuple(x)) for x, y in rows)

    # the same 8 windows both epochs, corrupted differently
    assert [w for w, _ in decode(e0)] == [w for w, _ in decode(e1)]
    assert [x for _, x in decode(e0)] != [x for _, x in decode(e1)]


def test_batches_resume_bit_exact():
    tokens = _tokens(2000)  # 28 windows of 70: 7 batches of 4 per epoch, so 20 batches cross two epochs
    ref = _batches(tokens, seed=5)
    first = [ref.next_batch() for _ in range(20)]
    for stop in (0, 1, 6, 7, 13):
        b = _batches(tokens, seed=5)
        for _ in range(stop):
            b.next_batch()
        c = _batches(tokens, seed=5)
        c.load_state_dict(b.state_dict())
        for i in range(stop, 20):
            batch = c.next_batch()
            assert torch.equal(batch.inputs, first[i].inputs) and torch.equal(batch.labels, first[i].labels)
    assert c.state_dict()["epoch"] == 2


def test_batches_refuse_bad_setups():
    tokens = _tokens(3000)
    with pytest.raises(MoekitError, match="fewer than batch_size"):
        _batches(tokens[:200], batch_size=4)
    with pytest.raises(MoekitError, match="contain sentinel ids"):
        SpanCorruptionBatches(tokens, 4, 64, 0, [5, 6, 7, 8, 9], EOS)  # ids of ordinary tokens
    with pytest.raises(ValueError, match="eos_id=1000 is one of the sentinel_ids"):
        SpanCorruptionBatches(tokens, 4, 64, 0, SENTINELS, 1000)
    with pytest.raises(ValueError, match="sentinel_ids holds only 2"):
        SpanCorruptionBatches(tokens, 4, 512, 0, SENTINELS[:2], EOS)
    with pytest.raises(ValueError, match="seed"):
        SpanCorruptionBatches(tokens, 4, 64, -1, SENTINELS, EOS)


# ---------------------------------------------------------------------------------------------------------------
# evaluation batches


def test_eval_data_covers_the_split_and_is_fixed():
    tokens = _tokens(1000, seed=1)  # 64 inputs <- 70 raw tokens: 14 windows (980 tokens), 20 left over
    ev = SpanCorruptionEvalData(tokens, 64, SENTINELS, EOS, seed=0)
    assert ev.num_windows == 14
    batches = list(ev.batches(4, None))
    assert [b.inputs.shape[0] for b in batches] == [4, 4, 4, 2]  # the last batch is smaller
    pairs = [(x, y) for b in batches for x, y in zip(b.inputs.tolist(), b.labels.tolist(), strict=True)]
    rebuilt = [t for x, y in pairs for t in _uncorrupt(x, y, SENTINELS)]
    assert rebuilt == tokens[: 14 * 70].tolist()  # consecutive windows, in order, covering the split
    # identical on every call and for every batch size; capped by max_batches
    again = list(ev.batches(4, None))
    assert all(
        torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels) for a, b in zip(batches, again, strict=True)
    )
    one = list(ev.batches(14, None))[0]
    assert torch.equal(one.inputs, torch.cat([b.inputs for b in batches]))
    assert torch.equal(one.labels, torch.cat([b.labels for b in batches]))
    assert sum(b.inputs.shape[0] for b in ev.batches(4, 2)) == 8
    # a different seed gives different masks over the same windows
    other = list(SpanCorruptionEvalData(tokens, 64, SENTINELS, EOS, seed=1).batches(14, None))[0]
    assert not torch.equal(other.inputs, one.inputs)


def test_eval_data_refuses_a_split_shorter_than_one_window():
    with pytest.raises(MoekitError, match="fewer than one span-corruption window of 70"):
        SpanCorruptionEvalData(_tokens(69), 64, SENTINELS, EOS)
    ev = SpanCorruptionEvalData(_tokens(70), 64, SENTINELS, EOS)
    with pytest.raises(ValueError, match="batch_size"):
        ev.batches(0, None)
