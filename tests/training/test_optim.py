"""Schedules and Adafactor's update clipping, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.training.adafactor import Adafactor
from moekit.training.schedule import lr_at


def test_schedules_golden():
    kw = dict(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    # warm-up: (step + 1) / 4
    assert [lr_at(s, schedule="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # cosine over 10 steps after warm-up: at step 9 (halfway) 0.1 + 0.9 * 0.5 = 0.55; at the end 0.1
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(14, schedule="cosine", **kw) == pytest.approx(0.1)
    # inverse sqrt: sqrt(4 / (step + 1)); at step 15: sqrt(4/16) = 0.5
    assert lr_at(15, schedule="inverse_sqrt", **kw) == pytest.approx(0.5)
    assert lr_at(99, schedule="constant", **kw) == 1.0


@pytest.mark.parametrize("shape", [(6,), (3, 4), (2, 3, 4)])
def test_adafactor_first_step_is_lr_times_sign_and_clipping_scales_it(shape):
    # Step 1: beta2_1 = 1 - 1^-0.8 = 0, so the second moment is g^2 itself. For a rank-1 g = a b^T the
    # factored estimate row_i col_j / mean(row) = a_i^2 b_j^2 is exact, so U = g / |g| = sign(g), RMS(U) = 1.
    torch.manual_seed(0)
    if len(shape) == 1:
        g = torch.randn(shape)
    else:
        a = torch.randn(shape[:-1]) + 3.0
        b = torch.randn(shape[-1:])
        g = a.unsqueeze(-1) * b
    for d, scale in ((1.0, 1.0), (0.5, 0.5)):  # d = 0.5: U / max(1, RMS(U) / d) = U / 2
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = g.clone()
        Adafactor([p], lr=0.1, update_clip_d=d).step()
        torch.testing.assert_close(p.detach(), -0.1 * scale * torch.sign(g), rtol=1e-5, atol=1e-6)


def test_adafactor_factored_state_is_small_and_step_counts():
    p = torch.nn.Parameter(torch.zeros(8, 16, 32))
    opt = Adafactor([p], lr=0.01)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    assert st["exp_avg_sq_row"].shape == (8, 16) and st["exp_avg_sq_col"].shape == (8, 32)
    assert float(st["step"]) == 3.0
    # beta2_t at step 3 = 1 - 3^-0.8
    assert 1 - 3**-0.8 == pytest.approx(0.5847, abs=1e-4) and math.isfinite(float(p.detach().abs().max()))
