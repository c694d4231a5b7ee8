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


# -- Adafactor against Hugging Face transformers' implementation (the reference trajectory) -------------------------
SHAPES = [(6,), (5, 7), (3, 4, 6)]  # unfactored, a matrix, an expert-bank stack (factored per matrix)


def _steps(ours: dict, theirs: dict, steps: int = 12) -> tuple[list, list]:
    """Run moekit's and transformers' Adafactor on copies of the same float64 parameters with the same gradients;
    return each one's step (new minus old parameter) at every step, per parameter. transformers computes in the
    parameters' float64, moekit in float32, so the two agree to float32 precision relative to each step."""
    hf = pytest.importorskip("transformers.optimization")
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.05 for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (1.0 + t) for s in SHAPES] for t in range(steps)]
    runs = []
    for make in (lambda ps: Adafactor(ps, **ours), lambda ps: hf.Adafactor(ps, **theirs)):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(params)
        deltas = []
        for t in range(steps):
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, grads[t], strict=True):
                p.grad = g.clone()
            opt.step()
            deltas.append([p.detach() - b for p, b in zip(params, before, strict=True)])
        runs.append(deltas)
    return runs[0], runs[1]


def _assert_same_steps(mine: list, ref: list) -> None:
    for t, (a, b) in enumerate(zip(mine, ref, strict=True)):
        for x, y in zip(a, b, strict=True):
            size = float(y.abs().max())
            assert size > 0, f"step {t + 1} moved nothing"
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * size, msg=f"step {t + 1}")


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("mode", ["relative_step", "warmup_init", "fixed_lr"])
def test_adafactor_follows_transformers_with_parameter_scale(mode, beta1):
    """T5's Adafactor: step ``rho_t * max(1e-3, RMS(X))`` with the relative step ``min(1e-2, 1/sqrt(t))`` (or its
    warm-up variant ``min(1e-6 t, 1/sqrt(t))``, or a fixed 3e-3), update clipping at d = 1, momentum on the scaled
    step, weight decay 0.01: every step of every parameter over 12 steps equals that of transformers'
    ``Adafactor`` on the same gradients."""
    common = dict(weight_decay=0.01, scale_parameter=True, relative_step=mode != "fixed_lr",
                  warmup_init=mode == "warmup_init")
    ours = dict(common, lr=3e-3, beta1=beta1)
    theirs = dict(common, lr=None if mode != "fixed_lr" else 3e-3, beta1=beta1 or None)
    _assert_same_steps(*_steps(ours, theirs))


def test_adafactor_without_the_options_is_the_plain_schedule_step():
    """scale_parameter and relative_step off: transformers with ``scale_parameter=False, relative_step=False`` and
    the same lr is the same optimizer (the trainer's schedule sets lr)."""
    _assert_same_steps(*_steps(dict(lr=1e-2, beta1=0.9),
                               dict(lr=1e-2, beta1=0.9, scale_parameter=False, relative_step=False)))


def test_adafactor_state_saved_before_the_options_resumes_at_its_scale():
    """A state dict without the step-size options (saved by an older moekit, whose momentum averaged unscaled
    updates) loads with the defaults and its momentum multiplied by the saved lr."""
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = Adafactor([p], lr=0.02, beta1=0.9)
    p.grad = torch.full((4, 3), 0.5)
    opt.step()
    saved = opt.state_dict()
    m = saved["state"][0]["exp_avg"].clone()
    for g in saved["param_groups"]:
        for key in ("scale_parameter", "relative_step", "warmup_init", "eps2"):
            del g[key]
    old = {"state": {0: {**saved["state"][0], "exp_avg": m / 0.02}}, "param_groups": saved["param_groups"]}
    fresh = Adafactor([p], lr=0.02, beta1=0.9)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.state[p]["exp_avg"], m)
    assert fresh.param_groups[0]["relative_step"] is False and fresh.param_groups[0]["eps2"] == 1e-3
