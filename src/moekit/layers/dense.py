"""The dense feed-forward block with exactly the math of one expert (so one expert == this FFN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.experts.activations import ACTIVATIONS, GATED, check_activation
from moekit.init import switch_init_

__all__ = ["DenseFFN"]


class DenseFFN(nn.Module):
    """``w_out(dropout(act(x @ w_in)))``, or gated ``act(x @ w_gate) * (x @ w_in)``; weights ``[D, F]`` / ``[F, D]``.

    Takes ``[..., d_model]`` and returns a tensor of the same shape (no aux: nothing is routed).
    """

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "gelu", *, init_scale: float = 0.1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = activation
        self.init_scale = float(init_scale)
        self.dropout = float(dropout)
        self.w_in = nn.Parameter(torch.empty(d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(d_model, d_ff)) if activation in GATED else None
        self.w_out = nn.Parameter(torch.empty(d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        switch_init_(self.w_in, fan_in=self.d_model, init_scale=self.init_scale)
        if self.w_gate is not None:
            switch_init_(self.w_gate, fan_in=self.d_model, init_scale=self.init_scale)
        switch_init_(self.w_out, fan_in=self.d_ff, init_scale=self.init_scale)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input width must equal d_model={self.d_model}, got shape {tuple(x.shape)}")
        act = ACTIVATIONS[self.activation]
        h = torch.matmul(x, self.w_in)
        h = act(torch.matmul(x, self.w_gate)) * h if self.w_gate is not None else act(h)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return torch.matmul(h, self.w_out)
