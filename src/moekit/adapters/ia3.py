"""(IA)3 and MoV: learned elementwise rescaling of an activation (docs/ALGORITHMS.md section 5).

Shape legend: ``...`` leading dims, ``H`` the rescaled activation width, ``E`` experts.

(IA)3 (Liu et al. 2022): ``a' = a * l`` with ``l_H`` initialised to 1. MoV (Zadouri et al. 2023): the
same site holds ``E`` vectors ``L_EH`` (all initialised to 1) and a router on ``a`` itself, ``s =
softmax(a @ W_r)``, ``a' = a * (s @ L_EH)``: "soft merging" costs one vector's compute per token.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.adapters.router import AdapterRouter


class IA3Scaler(nn.Module):
    """``a_...H -> a * vector_H``; identity at init."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.vector_H = nn.Parameter(torch.ones(width, dtype=torch.float32))

    def forward(self, a_xH: torch.Tensor) -> torch.Tensor:
        return a_xH * self.vector_H.to(a_xH.dtype)

    def merged_vector(self) -> torch.Tensor:
        return self.vector_H.detach()


class MoVScaler(nn.Module):
    """``a_...H -> a * (gates_...E @ experts_EH)`` with gates from a float32 router on ``a``; identity at
    init."""

    def __init__(self, width: int, num_experts: int, routing: str = "soft", top_k: int = 2,
                 router_input: str = "token") -> None:
        super().__init__()
        self.experts_EH = nn.Parameter(torch.ones(num_experts, width, dtype=torch.float32))
        self.router = AdapterRouter(width, num_experts, routing, top_k, router_input)

    def forward(self, a_xH: torch.Tensor) -> torch.Tensor:
        gates_xE = self.router(a_xH)
        # v = s @ L computed as 1 + s @ (L - 1): equal because the gates sum to 1, and exactly 1 while L
        # = 1, so the adapted model is bit-identical to the frozen one at init (sum(s) is 1 only up to
        # rounding).
        v_xH = 1.0 + gates_xE @ (self.experts_EH - 1.0)
        return a_xH * v_xH.to(a_xH.dtype)
