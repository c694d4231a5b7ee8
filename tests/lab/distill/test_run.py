"""The distillation run's figures."""

from __future__ import annotations

import pytest

from moekit.lab.distill.run import gain_kept


def test_gain_kept():
    # dense 5.0, teacher 4.0 (gain 1.0), student 4.7: it keeps (5.0 - 4.7) / 1.0 = 30%.
    assert gain_kept(5.0, 4.0, 4.7) == pytest.approx(0.3)
    assert gain_kept(5.0, 5.2, 4.9) is None  # no teacher gain to keep
