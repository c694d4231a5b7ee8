"""Soft MoE dispatch and combine weights (Puigcerver et al. 2023, docs/ALGORITHMS.md section 4).

Every slot is a convex mix of all tokens of its group, every token a convex mix of all slot outputs: no top-k, no
sorting, no dropping, and no interaction between groups. Logits use L2-normalised tokens and slot parameters times
a learned scalar ``scale`` (init ``scale_init``, 1.0 by default), which keeps them in a sane range as the width
grows (paper section 2.3).

Shape legend: B groups (rows of the batch), M tokens per group, D model width, E experts, P slots per expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.decision import SoftRoutingDecision

__all__ = ["SoftRouter", "l2_normalize"]


def l2_normalize(x: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` along ``dim``; the eps keeps an all-zero token finite."""
    return x * torch.rsqrt(torch.sum(x * x, dim=dim, keepdim=True) + eps)


class SoftRouter(nn.Module):
    """Holds ``phi`` ``[D, E, P]`` and ``scale``; returns a :class:`SoftRoutingDecision` of dispatch and combine
    weights ``[B, M, E, P]``.

    Args:
        d_model: D.
        num_experts: E.
        slots_per_expert: P.
        scale_init: the initial ``scale`` (> 0). At 1.0 the logits are cosines, within [-1, 1]; ``sqrt(d_model)``
            gives them the spread of un-normalised logits of LayerNorm'd tokens (docs/ALGORITHMS.md section 4).
    """

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1, scale_init: float = 1.0) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        if not (isinstance(scale_init, (int, float)) and not isinstance(scale_init, bool) and math.isfinite(scale_init)
                and scale_init > 0):
            raise ValueError(f"scale_init must be a finite number > 0, got {scale_init!r}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.scale_init = float(scale_init)
        self.phi = nn.Parameter(torch.empty(d_model, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LeCun normal over the input width; only the direction of phi matters after normalisation.
        nn.init.normal_(self.phi, std=1.0 / math.sqrt(self.d_model))
        with torch.no_grad():
            self.scale.fill_(self.scale_init)

    def logits(self, x_BMD: Tensor) -> Tensor:
        """``scale * (X / ||X||) @ (phi / ||phi||)`` in float32, ``[B, M, E, P]``."""
        with torch.autocast(device_type=x_BMD.device.type, enabled=False):
            xn_BMD = l2_normalize(x_BMD.float(), dim=-1)
            phin_DEP = l2_normalize(self.phi.float(), dim=0)
            return self.scale.float() * torch.einsum("bmd,dep->bmep", xn_BMD, phin_DEP)

    def forward(self, x_BMD: Tensor) -> SoftRoutingDecision:
        """Route B groups of M tokens; all weights float32.

        ``dispatch`` sums to 1 over tokens M for every slot; ``combine`` sums to 1 over all E*P slots for every
        token.
        """
        logits_BMEP = self.logits(x_BMD)
        B, M, E, P = logits_BMEP.shape
        dispatch_BMEP = torch.softmax(logits_BMEP, dim=1)
        combine_BMEP = torch.softmax(logits_BMEP.reshape(B, M, E * P), dim=-1).view(B, M, E, P)
        return SoftRoutingDecision(dispatch_BMEP, combine_BMEP, logits_BMEP)
