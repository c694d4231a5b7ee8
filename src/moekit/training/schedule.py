"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(
    step: int, *, lr: float, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float
) -> float:
    """Learning rate for the update made at ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup_steps``, then

    - "cosine": half a cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``max_steps``;
    - "inverse_sqrt": ``lr * sqrt(warmup / step)`` (T5 / ST-MoE style, with ``warmup >= 1``);
    - "constant".
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "inverse_sqrt":
        return lr * math.sqrt(max(1, warmup_steps) / max(step + 1, max(1, warmup_steps)))
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {schedule!r}")
