"""Router auxiliary losses as pure float32 functions (docs/ALGORITHMS.md section 2).

They live apart from the routers so that the math can be golden-tested on hand-made tensors and reused by every
layer type. Both cast to float32 first: the softmax and logsumexp are the numerically sensitive part of MoE
training (Switch "selective precision", ST-MoE section 3).

Shape legend: S tokens in the routing group, E experts, K experts chosen per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_balancing_loss", "router_z_loss"]


def load_balancing_loss(
    probs_SE: Tensor, expert_ids_SK: Tensor, num_experts: int, *, num_groups: int = 1
) -> Tensor:
    """Switch Transformer eq. 4 generalised to k choices: ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the group's routed assignments (all k choices, counted before capacity dropping)
    that go to expert i, so ``sum f = 1``; ``P_i`` is the mean router probability of expert i over the tokens.
    The loss is 1.0 at perfect balance. Gradients flow through ``P`` only (``f`` is a count).

    Args:
        probs_SE: router probabilities (softmax over experts), any float dtype; computed in float32.
        expert_ids_SK: int64 expert index of each token's k choices.
        num_experts: E.
        num_groups: the S tokens form this many equal, consecutive routing groups; the loss is computed per group
            and averaged (as Switch / T5X do), which equals the plain formula when there is one group.
    Returns:
        A float32 scalar.
    """
    if probs_SE.dim() != 2 or probs_SE.shape[-1] != num_experts:
        raise ValueError(f"probs_SE must have shape [S, {num_experts}], got {tuple(probs_SE.shape)}")
    if expert_ids_SK.dim() != 2 or expert_ids_SK.shape[0] != probs_SE.shape[0]:
        raise ValueError(
            f"expert_ids_SK must have shape [S={probs_SE.shape[0]}, K], got {tuple(expert_ids_SK.shape)}"
        )
    S, K = expert_ids_SK.shape
    if num_groups < 1 or S % num_groups != 0:
        raise ValueError(f"{S} tokens cannot be split into {num_groups} equal routing groups")
    T = S // num_groups
    group_S = torch.arange(S, device=expert_ids_SK.device) // T
    key = (group_S.unsqueeze(1) * num_experts + expert_ids_SK).reshape(-1)
    # A scatter-add rather than bincount: bincount asks the device for max(key) first, a host sync on GPU.
    counts_GE = torch.zeros(num_groups * num_experts, dtype=torch.int64, device=key.device)
    counts_GE = counts_GE.index_add_(0, key, torch.ones_like(key)).view(num_groups, num_experts)
    f_GE = counts_GE.to(torch.float32) / max(T * K, 1)
    P_GE = probs_SE.float().view(num_groups, T, num_experts).mean(dim=1)
    return num_experts * torch.sum(f_GE * P_GE, dim=-1).mean()


def router_z_loss(logits_SE: Tensor) -> Tensor:
    """ST-MoE eq. 5: ``mean over tokens of logsumexp(logits)^2`` on the raw float32 router logits.

    It penalises large logits, which round badly in low precision and make the softmax saturate.
    Returns a float32 scalar.
    """
    if logits_SE.dim() != 2:
        raise ValueError(f"logits_SE must have shape [S, E], got {tuple(logits_SE.shape)}")
    lse_S = torch.logsumexp(logits_SE.float(), dim=-1)
    return torch.mean(lse_S * lse_S)
