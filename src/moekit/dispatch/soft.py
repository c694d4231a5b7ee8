"""The Soft MoE plan: slots are the expert bank's rows (Puigcerver et al. 2023, docs/ALGORITHMS.md section 4).

Each slot is a convex mix of its group's tokens (``dispatch`` weights), each token a convex mix of all slot outputs
(``combine`` weights); both are dense einsums, nothing is sorted or dropped. Slots are laid out expert-major
(expert, group, slot), so every expert owns one contiguous block of ``B * P`` rows: the same shape of plan as the
gather plans, which is what lets the expert-parallel dispatcher run Soft MoE unchanged.

Shape legend: S = B * M tokens, B groups, M tokens per group, D model width, E experts, P slots per expert,
A = E * B * P rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.routing.decision import SoftRoutingDecision

__all__ = ["SoftPlan", "plan_soft"]


@dataclass(repr=False)
class SoftPlan:
    """Dispatch and combine weights ``[B, M, E, P]`` (float32) and the row layout they imply."""

    dispatch_BMEP: Tensor
    combine_BMEP: Tensor
    tokens_per_expert_E: Tensor
    rows_per_expert: int

    num_dropped: int = 0
    capacity: int | None = None

    @property
    def drop_fraction(self) -> float:
        return 0.0

    def dispatch(self, x_SD: Tensor) -> Tensor:
        """Slots ``[E * B * P, D]``: mixes of the original tokens (not the normalised ones the logits use)."""
        B, M, E, P = self.dispatch_BMEP.shape
        x_BMD = x_SD.view(B, M, x_SD.shape[-1])
        slots_EBPD = torch.einsum("bmep,bmd->ebpd", self.dispatch_BMEP.to(x_SD.dtype), x_BMD)
        return slots_EBPD.reshape(E * B * P, -1)

    def combine(self, y_AD: Tensor) -> Tensor:
        """Each token's combine-weighted sum of all slot outputs: ``[S, D]``."""
        B, M, E, P = self.combine_BMEP.shape
        y_EBPD = y_AD.view(E, B, P, y_AD.shape[-1])
        y_BMD = torch.einsum("bmep,ebpd->bmd", self.combine_BMEP.to(y_AD.dtype), y_EBPD)
        return y_BMD.reshape(B * M, -1)

    def __repr__(self) -> str:
        B, M, E, P = self.dispatch_BMEP.shape
        return f"SoftPlan(groups={B}, tokens_per_group={M}, experts={E}, slots_per_expert={P})"


def plan_soft(decision: SoftRoutingDecision) -> SoftPlan:
    B, M, E, P = decision.dispatch_BMEP.shape
    counts_E = torch.full((E,), B * P, dtype=torch.int64, device=decision.dispatch_BMEP.device)
    return SoftPlan(decision.dispatch_BMEP, decision.combine_BMEP, counts_E, B * P)
