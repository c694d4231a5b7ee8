"""LoRA and MoLoRA: a low-rank update added to a frozen linear layer's output (docs/ALGORITHMS.md section 5).

Shape legend: ``...`` leading dims, ``I`` in features, ``O`` out features, ``r`` rank, ``E`` experts.

LoRA (Hu et al. 2021): ``y = W0 x + (alpha / r) * B(A x)``, A random, B = 0, so the update starts at zero.
MoLoRA (Zadouri et al. 2023): ``E`` such pairs mixed by a float32 router on the layer input,
``y = W0 x + (alpha / r) * sum_i s_i * B_i(A_i x)``, every ``B_i = 0`` at init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.adapters.router import AdapterRouter


def _init_a(a_xrI: torch.Tensor) -> None:
    # Kaiming-uniform with a = sqrt(5), the nn.Linear default that LoRA implementations use for A.
    for a_rI in a_xrI.reshape(-1, *a_xrI.shape[-2:]):
        nn.init.kaiming_uniform_(a_rI, a=math.sqrt(5))


class LoRADelta(nn.Module):
    """``x_...I -> (alpha / r) * B(A(dropout(x)))`` of shape ``[..., O]``; zero at init."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.a_rI = nn.Parameter(torch.empty(r, d_in, dtype=torch.float32))
        self.b_Or = nn.Parameter(torch.zeros(d_out, r, dtype=torch.float32))
        _init_a(self.a_rI.data)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_xI: torch.Tensor) -> torch.Tensor:
        h_xr = self.dropout(x_xI) @ self.a_rI.to(x_xI.dtype).T
        return (h_xr @ self.b_Or.to(x_xI.dtype).T) * self.scaling

    def merged_delta(self) -> torch.Tensor:
        """``(alpha / r) * B A`` of shape ``[O, I]``, the update folded into ``W0`` by ``merge_adapters``."""
        return (self.b_Or @ self.a_rI).detach() * self.scaling


class MoLoRADelta(nn.Module):
    """``x_...I -> (alpha / r) * sum_e gates_e * B_e(A_e x)``; zero at init.

    All experts are computed densely (E * r is tiny next to the frozen layer); top-k only zeroes the
    gates of the unselected experts, which gives the same output as skipping them.
    """

    def __init__(self, d_in: int, d_out: int, num_experts: int, r: int, alpha: float, routing: str = "soft",
                 top_k: int = 2, router_input: str = "token", dropout: float = 0.0) -> None:
        super().__init__()
        self.a_ErI = nn.Parameter(torch.empty(num_experts, r, d_in, dtype=torch.float32))
        self.b_EOr = nn.Parameter(torch.zeros(num_experts, d_out, r, dtype=torch.float32))
        _init_a(self.a_ErI.data)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.router = AdapterRouter(d_in, num_experts, routing, top_k, router_input)

    def forward(self, x_xI: torch.Tensor) -> torch.Tensor:
        gates_xE = self.router(x_xI).to(x_xI.dtype)
        h_xEr = torch.einsum("...i,eri->...er", self.dropout(x_xI), self.a_ErI.to(x_xI.dtype))
        h_xEr = h_xEr * gates_xE.unsqueeze(-1)
        return torch.einsum("...er,eor->...o", h_xEr, self.b_EOr.to(x_xI.dtype)) * self.scaling
