"""Resumable token batches, evaluation windows and the unigram baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.data.batches import TokenBatches, eval_windows, unigram_cross_entropy
from moekit.errors import MoekitError


def test_batches_are_deterministic_and_resume_exactly():
    tokens = np.arange(1000, dtype=np.int32)
    a = TokenBatches(tokens, batch_size=4, seq_len=10, seed=3)
    first = [a.next_batch() for _ in range(30)]  # 99 windows, 24 batches per epoch: crosses an epoch
    x, y = first[0]
    assert x.shape == (4, 10) and bool((y == x + 1).all())  # targets are the next tokens
    assert (x[:, 0] % 10 == 0).all()  # windows start at multiples of seq_len
    b = TokenBatches(tokens, batch_size=4, seq_len=10, seed=3)
    for _ in range(7):
        b.next_batch()
    state = b.state_dict()
    c = TokenBatches(tokens, batch_size=4, seq_len=10, seed=3)
    c.load_state_dict(state)
    for i in range(7, 30):
        x_c, _ = c.next_batch()
        assert bool((x_c == first[i][0]).all())
    assert c.state_dict()["epoch"] == 1
    with pytest.raises(MoekitError, match="fewer than train.batch_size"):
        TokenBatches(tokens[:30], batch_size=4, seq_len=10, seed=0)



def test_skip_moves_the_position_as_drawing_would():
    tokens = np.arange(1000, dtype=np.int32)  # 99 windows of 10 + 1, 24 batches of 4 per epoch
    drawn = TokenBatches(tokens, batch_size=4, seq_len=10, seed=5)
    first = [drawn.next_batch()[0] for _ in range(30)]
    assert drawn.batches_per_epoch() == 24
    for k in (0, 1, 23, 24, 25):  # within the first epoch, at its end and past it
        skipped = TokenBatches(tokens, batch_size=4, seq_len=10, seed=5)
        skipped.skip(k)
        assert all(bool((skipped.next_batch()[0] == first[i]).all()) for i in range(k, 30))
    moved = TokenBatches(tokens, batch_size=4, seq_len=10, seed=5)
    moved.skip(25)  # one batch into the second epoch, as 25 draws leave it
    assert moved.state_dict() == {"epoch": 1, "index": 4}
    moved.skip(0)
    assert moved.state_dict() == {"epoch": 1, "index": 4}
    for bad in (-1, 1.5, True):
        with pytest.raises(MoekitError, match="non-negative integer"):
            moved.skip(bad)

def test_eval_windows_and_unigram_baseline_golden():
    val = np.array([0, 1, 1, 2, 2], dtype=np.int32)
    batches = list(eval_windows(val, batch_size=1, seq_len=2, max_batches=None))
    assert [b[0].tolist() for b in batches] == [[[0, 1]], [[1, 2]]]
    train = np.array([0, 1, 1, 1], dtype=np.int32)
    # add-one counts over V=3: [2, 4, 1] / 7; targets of the 2 windows: 1, 1, 2, 2
    expected = -(2 * math.log(4 / 7) + 2 * math.log(1 / 7)) / 4
    assert unigram_cross_entropy(train, val, 3, seq_len=2) == pytest.approx(expected)
