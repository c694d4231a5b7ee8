"""The dense feed-forward block with exactly the math of one expert (so one expert == this FFN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.experts.activations import GATED, check_activation
from moekit.experts.ffn import feed_forward
from moekit.init import switch_init_

__all__ = ["DenseFFN"]


class DenseFFN(nn.Module):
    """``w_out(dropout(act(x @ w_in)))``, or gated ``act(x @ w_gate) * (x @ w_in)``; weights ``[D, F]`` / ``[F, D]``.

    Takes ``[..., d_model]`` and returns ``(y, None)``: the same protocol as the sparse layers (``(y, aux)``), with no
    aux because nothing is routed, so a model block calls any FFN the same way.
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

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input width must equal d_model={self.d_model}, got shape {tuple(x.shape)}")
        y = feed_forward(
            x, self.w_in, self.w_gate, self.w_out, self.activation, dropout=self.dropout, training=self.training
        )
        return y, None
