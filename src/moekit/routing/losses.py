"""Router auxiliary losses as pure float32 functions (docs/ALGORITHMS.md section 2).

They live apart from the routers so that the math can be golden-tested on hand-made tensors and reused by every
layer type. Both cast to float32 first: the softmax and logsumexp are the numerically sensitive part of MoE
training (Switch "selective precision", ST-MoE section 3).

Shape legend: S tokens in the routing group, E experts, K experts chosen per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["load_balancing_loss", "router_z_loss"]


def load_balancing_loss(
    probs_SE: Tensor,
    expert_ids_SK: Tensor,
    num_experts: int,
    *,
    num_groups: int = 1,
    mask_S: Tensor | None = None,
    global_counts: bool = False,
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
            and averaged (as Switch / T5X do), which equals the plain formula when there is one group. With
            groups that are sequences and sigmoid scores normalised over experts as ``probs_SE`` this is
            DeepSeek-V3's sequence-wise balance loss (its ``f_i = E / (K T) * count_i`` is E times this ``f_i``).
        mask_S: bool, True for real tokens; padding (False) counts in neither ``f`` nor ``P``, and a group's terms
            are over its real tokens (a group with none is left out of the mean).
        global_counts: count ``f`` over all S tokens (one group) and, under torch.distributed, over every rank of
            the default process group (one all-reduce of the counts; every rank must call it), while ``P`` stays
            this call's: the global-batch balance of Qwen (Qiu et al. 2025). Counts carry no gradient, so the
            gradient is that of the local ``P``.
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
    if global_counts:
        num_groups = 1
    if num_groups < 1 or S % num_groups != 0:
        raise ValueError(f"{S} tokens cannot be split into {num_groups} equal routing groups")
    if mask_S is not None or global_counts:
        return _weighted_balance_loss(probs_SE, expert_ids_SK, num_experts, num_groups, mask_S, global_counts)
    T = S // num_groups
    group_S = torch.arange(S, device=expert_ids_SK.device) // T
    key = (group_S.unsqueeze(1) * num_experts + expert_ids_SK).reshape(-1)
    # A scatter-add rather than bincount: bincount asks the device for max(key) first, a host sync on GPU.
    counts_GE = torch.zeros(num_groups * num_experts, dtype=torch.int64, device=key.device)
    counts_GE = counts_GE.index_add_(0, key, torch.ones_like(key)).view(num_groups, num_experts)
    f_GE = counts_GE.to(torch.float32) / max(T * K, 1)
    P_GE = probs_SE.float().view(num_groups, T, num_experts).mean(dim=1)
    return num_experts * torch.sum(f_GE * P_GE, dim=-1).mean()


def _weighted_balance_loss(
    probs_SE: Tensor, expert_ids_SK: Tensor, E: int, G: int, mask_S: Tensor | None, global_counts: bool
) -> Tensor:
    """The balance loss over real tokens only (weights 1 / 0), optionally with globally counted fractions."""
    S, K = expert_ids_SK.shape
    T = S // G
    w_S = torch.ones(S, device=probs_SE.device) if mask_S is None else mask_S.reshape(S).to(torch.float32)
    group_S = torch.arange(S, device=expert_ids_SK.device) // T
    key_N = (group_S.unsqueeze(1) * E + expert_ids_SK).reshape(-1)
    counts_GE = torch.zeros(G * E, dtype=torch.float32, device=key_N.device)
    counts_GE = counts_GE.index_add_(0, key_N, w_S.repeat_interleave(K)).view(G, E)
    n_G = w_S.view(G, T).sum(dim=1)
    if global_counts and dist.is_available() and dist.is_initialized():
        both = torch.cat([counts_GE.reshape(-1), n_G])
        dist.all_reduce(both)
        f_GE = both[:E].view(1, E) / (both[E] * K).clamp(min=1)
    else:
        f_GE = counts_GE / (n_G.unsqueeze(1) * K).clamp(min=1)
    P_GE = (probs_SE.float() * w_S.unsqueeze(1)).view(G, T, E).sum(dim=1) / n_G.unsqueeze(1).clamp(min=1)
    has_tokens_G = (n_G > 0).to(torch.float32)
    per_group_G = E * torch.sum(f_GE * P_GE, dim=-1) * has_tokens_G
    return per_group_G.sum() / has_tokens_G.sum().clamp(min=1)


def router_z_loss(logits_SE: Tensor, mask_S: Tensor | None = None) -> Tensor:
    """ST-MoE eq. 5: ``mean over tokens of logsumexp(logits)^2`` on the raw float32 router logits.

    It penalises large logits, which round badly in low precision and make the softmax saturate. ``mask_S``
    (True = real token) leaves padding out of the mean. Returns a float32 scalar.
    """
    if logits_SE.dim() != 2:
        raise ValueError(f"logits_SE must have shape [S, E], got {tuple(logits_SE.shape)}")
    lse_S = torch.logsumexp(logits_SE.float(), dim=-1)
    if mask_S is None:
        return torch.mean(lse_S * lse_S)
    w_S = mask_S.reshape(-1).to(torch.float32)
    return torch.sum(lse_S * lse_S * w_S) / w_S.sum().clamp(min=1)
