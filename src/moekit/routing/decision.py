"""The value a router hands to a dispatcher: where each token goes, with what weight.

Routers decide and never move data; dispatchers move data and never decide. These small dataclasses are the seam.

Shape legend: S tokens (all groups of one call, flattened), E experts, K choices per token, C tokens per expert
(expert choice).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["RoutingDecision", "ExpertChoiceDecision"]


@dataclass
class RoutingDecision:
    """Token-choice routing of S tokens.

    Attributes:
        expert_ids_SK: int64, the k experts each token chose (best first).
        gates_SK: float32 combine weights of those choices.
        probs_SE: float32 router probabilities (softmax over experts, before top-k); used by the balance loss.
        logits_SE: float32 raw router logits; used by the z-loss.
        valid_SK: bool or None. False marks a choice the router itself declined (second-expert policy "random");
            it takes no capacity slot and contributes nothing. None means every choice is valid.
        priority_S: int64 or None. The order in which tokens claim capacity slots within a choice rank
            (batch-priority routing). None means group order.
    """

    expert_ids_SK: Tensor
    gates_SK: Tensor
    probs_SE: Tensor
    logits_SE: Tensor
    valid_SK: Tensor | None = None
    priority_S: Tensor | None = None


@dataclass
class ExpertChoiceDecision:
    """Expert-choice routing of one or more groups: each expert picks its C best tokens of each group.

    Attributes:
        token_ids_GEC: int64 index of the chosen token *within its group* ([groups, E, C]).
        gates_GEC: float32 router probability of each chosen (expert, token) pair.
        probs_SE: float32 router probabilities of all tokens (softmax over experts).
        logits_SE: float32 raw router logits.
    """

    token_ids_GEC: Tensor
    gates_GEC: Tensor
    probs_SE: Tensor
    logits_SE: Tensor
