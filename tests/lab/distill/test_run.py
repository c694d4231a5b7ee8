"""The distillation run's figures."""

from __future__ import annotations

import pytest

from moekit.lab.distill.run import gain_kept, teacher_batches_replayed


def test_gain_kept():
    # dense 5.0, teacher 4.0 (gain 1.0), student 4.7: it keeps (5.0 - 4.7) / 1.0 = 30%.
    assert gain_kept(5.0, 4.0, 4.7) == pytest.approx(0.3)
    assert gain_kept(5.0, 5.2, 4.9) is None  # no teacher gain to keep


def test_teacher_batches_replayed():
    # Same seed and batch size: the teacher walked positions [0, 100) of the order, the student walks
    # [offset, offset + 50).
    assert teacher_batches_replayed(3, 16, 100, 3, 16, 0, 50) == 50  # the default: the teacher's first 50 batches
    assert teacher_batches_replayed(3, 16, 100, 3, 16, 80, 50) == 20  # positions 80..99 replayed, 100..129 fresh
    assert teacher_batches_replayed(3, 16, 100, 3, 16, 100, 50) == 0  # right after the teacher's last batch
    assert teacher_batches_replayed(3, 16, 100, 3, 16, 200, 50) == 0
    # Another seed or batch size: another order, no batch recurs whole.
    assert teacher_batches_replayed(3, 16, 100, 4, 16, 0, 50) is None
    assert teacher_batches_replayed(3, 16, 100, 3, 8, 0, 50) is None
