"""Expert-choice routing (Zhou et al. 2022, docs/ALGORITHMS.md section 3).

Each expert takes the ``ceil(S * c / E)`` tokens of its group that score it highest, so experts are balanced by
construction and a token may get 0..E experts. It looks across the whole group, so it is non-causal: a causal LM
must refuse it.

Shape legend: G groups, S tokens per group, D model width, E experts, C tokens each expert takes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.init import switch_init_
from moekit.routing.decision import ExpertChoiceDecision
from moekit.routing.topk import _router_logits

__all__ = ["ExpertChoiceRouter", "expert_choice_capacity"]


def expert_choice_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(S * c / E)``, at least 1 and at most S."""
    return max(1, min(tokens_per_group, math.ceil(tokens_per_group * capacity_factor / num_experts)))


class ExpertChoiceRouter(nn.Module):
    """Expert choice: ``p = softmax(x @ W^T)`` over experts, then each expert keeps its top-C tokens by ``p``.

    Args:
        d_model: width of the router input.
        num_experts: E.
        capacity_factor: c; each expert takes ``ceil(S * c / E)`` tokens (c = 1: on average one expert per token).
        init_scale: Switch init scale for ``weight``.
    """

    def __init__(
        self, d_model: int, num_experts: int, capacity_factor: float = 1.0, *, init_scale: float = 0.1
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if capacity_factor is None or capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 for expert choice, got {capacity_factor}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.capacity_factor = float(capacity_factor)
        self.init_scale = float(init_scale)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        switch_init_(self.weight, fan_in=self.d_model, init_scale=self.init_scale)

    def forward(self, x_GSD: Tensor) -> ExpertChoiceDecision:
        """Route each of the G groups of ``x_GSD`` (a 2-D input is one group)."""
        if x_GSD.dim() == 2:
            x_GSD = x_GSD.unsqueeze(0)
        G, S, D = x_GSD.shape
        logits_GSE = _router_logits(x_GSD.reshape(G * S, D).float(), self.weight, torch.float32).view(G, S, -1)
        probs_GSE = torch.softmax(logits_GSE, dim=-1)  # float32: the softmax is the sensitive step
        C = expert_choice_capacity(S, self.num_experts, self.capacity_factor)
        gates_GEC, token_ids_GEC = torch.topk(probs_GSE.transpose(1, 2), C, dim=-1)
        return ExpertChoiceDecision(
            token_ids_GEC=token_ids_GEC,
            gates_GEC=gates_GEC,
            probs_SE=probs_GSE.reshape(G * S, -1),
            logits_SE=logits_GSE.reshape(G * S, -1),
        )
