"""What a router hands to a dispatcher: where each token goes, with what weight, plus what the aux losses need.

Routers decide and never move data; dispatchers move data and never decide. Every router returns one of the three
decision types below, and each decision knows its own auxiliary losses and routing metrics, so the layer builds its
:class:`~moekit.layers.aux.MoEAux` with no per-router branch. ``moekit.dispatch.plan_routing`` turns any decision
into a plan of rows for the expert bank.

Shape legend: S tokens of the call (G groups of T tokens, flattened), E experts, K choices per token, C tokens each
expert takes per group (expert choice), B groups and M tokens per group and P slots per expert (Soft MoE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.routing.losses import load_balancing_loss, router_z_loss

__all__ = [
    "AnyDecision",
    "ExpertChoiceDecision",
    "RoutingDecision",
    "SoftRoutingDecision",
    "TokenChoiceDecision",
    "entropy_nats",
]


def entropy_nats(probs_NX: Tensor) -> Tensor:
    """Mean over rows of ``-sum p log p`` (nats) along the last dimension, detached, float32."""
    p = probs_NX.detach().float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean()


def _zero_like(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=t.device)


class _RouterStatistics:
    """The z-loss and statistics of a router with logits and probabilities over experts (token and expert choice)."""

    probs_SE: Tensor
    logits_SE: Tensor
    mask_S: Tensor | None = None  # True for real tokens; statistics leave padding out

    def z_loss(self) -> Tensor:
        return router_z_loss(self.logits_SE, self.mask_S)

    def router_entropy(self) -> Tensor:
        probs = self.probs_SE if self.mask_S is None else self.probs_SE[self.mask_S.reshape(-1)]
        return entropy_nats(probs) if probs.shape[0] else _zero_like(self.probs_SE)

    def max_logit(self) -> Tensor:
        logits = self.logits_SE if self.mask_S is None else self.logits_SE[self.mask_S.reshape(-1)]
        return logits.detach().max() if logits.shape[0] else _zero_like(self.logits_SE)


@dataclass(repr=False)
class TokenChoiceDecision(_RouterStatistics):
    """Token-choice routing of S tokens: each token picks its K experts.

    Attributes:
        expert_ids_SK: int64, the k experts each token chose (best first).
        gates_SK: float32 combine weights of those choices.
        probs_SE: float32 router probabilities (softmax over experts, before top-k); used by the balance loss.
        logits_SE: float32 raw router logits; used by the z-loss.
        valid_SK: bool or None. False marks a choice the router itself declined (second-expert policy "random");
            it takes no capacity slot and contributes nothing. None means every choice is valid.
        priority_S: int64 or None. The order in which tokens claim capacity slots within a choice rank
            (batch-priority routing). None means group order.
        capacity: slots per expert per routing group, or None for dropless.
        num_groups: the S tokens form this many equal, consecutive routing groups (capacity and the balance loss
            are per group).
        mask_S: bool or None; False marks padding: its choices are declined (no slot, no output from the routed
            experts) and it counts in no loss or statistic.
        balance_groups: the balance loss is computed per this many equal groups instead of the routing groups
            (the layer sets it to the number of sequences for DeepSeek-V3's sequence-wise loss).
        balance_global: the balance loss counts expert fractions over the whole call and every rank (Qwen's
            global-batch balance).
    """

    expert_ids_SK: Tensor
    gates_SK: Tensor
    probs_SE: Tensor
    logits_SE: Tensor
    valid_SK: Tensor | None = None
    priority_S: Tensor | None = None
    capacity: int | None = None
    num_groups: int = 1
    mask_S: Tensor | None = None
    balance_groups: int | None = None
    balance_global: bool = False
    _router_load: Tensor | None = field(default=None, init=False, compare=False)

    def router_load(self) -> Tensor:
        """int64 ``[E]``: the choices each expert received, before capacity (declined and masked ones excluded):
        the load the router asked for, which loss-free balancing and the max violation measure. Counted once per
        decision (the router's balancing count and the layer's aux read the same tensor)."""
        if self._router_load is None:
            E = self.probs_SE.shape[-1]
            ids_N = self.expert_ids_SK.reshape(-1) if self.valid_SK is None else self.expert_ids_SK[self.valid_SK]
            zeros_E = torch.zeros(E, dtype=torch.int64, device=ids_N.device)
            self._router_load = zeros_E.index_add_(0, ids_N, torch.ones_like(ids_N))
        return self._router_load

    def load_balancing_loss(self) -> Tensor:
        """Switch eq. 4 over the k choices, per routing group (or per ``balance_groups``), averaged."""
        E = self.probs_SE.shape[-1]
        groups = self.num_groups if self.balance_groups is None else self.balance_groups
        return load_balancing_loss(
            self.probs_SE, self.expert_ids_SK, E, num_groups=groups, mask_S=self.mask_S,
            global_counts=self.balance_global,
        )

    def __repr__(self) -> str:
        S, K = self.expert_ids_SK.shape
        return (
            f"TokenChoiceDecision(tokens={S}, top_k={K}, experts={self.probs_SE.shape[-1]}, "
            f"capacity={self.capacity}, groups={self.num_groups}, "
            f"declined={'none' if self.valid_SK is None else int((~self.valid_SK).sum())}, "
            f"batch_priority={self.priority_S is not None})"
        )


# The public name of the token-choice decision before expert choice and Soft MoE had typed decisions too.
RoutingDecision = TokenChoiceDecision


@dataclass(repr=False)
class ExpertChoiceDecision(_RouterStatistics):
    """Expert-choice routing of G groups: each expert picks its C best tokens of each group.

    Attributes:
        token_ids_GEC: int64 index of the chosen token *within its group*.
        gates_GEC: float32 router probability of each chosen (expert, token) pair (the combine weight).
        probs_SE: float32 router probabilities of all tokens (softmax over experts).
        logits_SE: float32 raw router logits.
    """

    token_ids_GEC: Tensor
    gates_GEC: Tensor
    probs_SE: Tensor
    logits_SE: Tensor

    def router_load(self) -> Tensor:
        """Every expert takes C tokens of each of the G groups."""
        G, E, C = self.token_ids_GEC.shape
        return torch.full((E,), G * C, dtype=torch.int64, device=self.token_ids_GEC.device)

    def load_balancing_loss(self) -> Tensor:
        """0: every expert takes exactly C tokens per group, balanced by construction (Zhou et al. 2022)."""
        return _zero_like(self.logits_SE)

    def __repr__(self) -> str:
        G, E, C = self.token_ids_GEC.shape
        return f"ExpertChoiceDecision(groups={G}, experts={E}, tokens_per_expert_per_group={C})"


@dataclass(repr=False)
class SoftRoutingDecision:
    """Soft MoE routing of B groups of M tokens into E experts with P slots each.

    Attributes:
        dispatch_BMEP: float32; every slot's weights over its group's M tokens (sum to 1 over M).
        combine_BMEP: float32; every token's weights over all E * P slots (sum to 1 over E, P).
        logits_BMEP: float32 logits both are softmaxes of.
    """

    dispatch_BMEP: Tensor
    combine_BMEP: Tensor
    logits_BMEP: Tensor

    def router_load(self) -> Tensor:
        """Every expert processes its P slots of each of the B groups."""
        B, M, E, P = self.dispatch_BMEP.shape
        return torch.full((E,), B * P, dtype=torch.int64, device=self.dispatch_BMEP.device)

    def load_balancing_loss(self) -> Tensor:
        """0: every slot is filled, nothing to balance."""
        return _zero_like(self.logits_BMEP)

    def z_loss(self) -> Tensor:
        """0: there are no router logits over experts to keep small (the logits are bounded by ``scale``)."""
        return _zero_like(self.logits_BMEP)

    def router_entropy(self) -> Tensor:
        """Mean entropy of each token's combine weights over the E * P slots."""
        B, M, E, P = self.combine_BMEP.shape
        return entropy_nats(self.combine_BMEP.reshape(B * M, E * P))

    def max_logit(self) -> Tensor:
        return self.logits_BMEP.detach().max()

    def __repr__(self) -> str:
        B, M, E, P = self.combine_BMEP.shape
        return f"SoftRoutingDecision(groups={B}, tokens_per_group={M}, experts={E}, slots_per_expert={P})"


AnyDecision = TokenChoiceDecision | ExpertChoiceDecision | SoftRoutingDecision
