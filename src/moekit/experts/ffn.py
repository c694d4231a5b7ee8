"""The feed-forward math of one expert, written once: ``w_out(dropout(act(x w_in)))`` or, gated (Shazeer 2020),
``w_out(dropout(act(x w_gate) * (x w_in)))``.

The dense FFN, the expert bank's grouped path and its batched path differ only in how they multiply, so each
passes its own ``matmul``; the weights are cast to the input's dtype first because the grouped and batched products
are not on autocast's lists (under bf16 autocast the rows arrive in bf16 while the weights stay float32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.experts.activations import ACTIVATIONS

__all__ = ["feed_forward"]


def feed_forward(
    x: Tensor,
    w_in: Tensor,
    w_gate: Tensor | None,
    w_out: Tensor,
    activation: str,
    *,
    dropout: float = 0.0,
    training: bool = False,
    matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul,
) -> Tensor:
    """One FFN (or a bank of them, through ``matmul``) on ``x``; dropout on the hidden activation when training."""
    if x.dtype != w_in.dtype:
        w_in, w_out = w_in.to(x.dtype), w_out.to(x.dtype)
        w_gate = w_gate.to(x.dtype) if w_gate is not None else None
    act = ACTIVATIONS[activation]
    h = matmul(x, w_in)
    h = act(matmul(x, w_gate)) * h if w_gate is not None else act(h)
    if dropout > 0:
        h = F.dropout(h, dropout, training)
    return matmul(h, w_out)
