"""Token-choice top-k routing: Switch (k=1), GShard / GLaM / ST-MoE (k=2), noisy top-k (Shazeer 2017).

docs/ALGORITHMS.md section 1. The router never moves data: it returns a TokenChoiceDecision for a dispatcher.

Shape legend: S tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.init import switch_init_
from moekit.routing.decision import TokenChoiceDecision

__all__ = ["TopKRouter", "SECOND_EXPERT_POLICIES", "ROUTER_DTYPES", "token_choice_capacity"]

SECOND_EXPERT_POLICIES = ("all", "random")
ROUTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def token_choice_capacity(
    tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float | None, min_capacity: int = 4
) -> int | None:
    """``max(min_capacity, ceil(CF * k * T / E))`` capped at T; ``None`` (dropless) when ``capacity_factor`` is None.

    With CF = 1.0 the slots exactly fit a perfectly balanced group. The cap at T holds because one expert can
    receive each token of the group at most once.
    """
    if capacity_factor is None:
        return None
    cap = max(min_capacity, math.ceil(capacity_factor * top_k * tokens_per_group / num_experts))
    return min(cap, tokens_per_group)


def _router_logits(x_SD: Tensor, weight_ED: Tensor, dtype: torch.dtype) -> Tensor:
    """``x @ W^T`` in ``dtype`` with autocast switched off, so bf16 autocast cannot lower the router's precision.

    Switch Table 2: a bf16 router diverged while a float32 router ("selective precision") matched float32 quality.
    """
    with torch.autocast(device_type=x_SD.device.type, enabled=False):
        return F.linear(x_SD.to(dtype), weight_ED.to(dtype))


class TopKRouter(nn.Module):
    """Token choice: each token picks its k highest-probability experts.

    Args:
        d_model: width of the router input.
        num_experts: E.
        top_k: k >= 1 experts per token.
        normalize_gates: divide the k kept probabilities by their sum (+1e-9). Default: True when k > 1
            (GShard, ST-MoE), False when k = 1 (Switch: the gate is the raw softmax probability).
        jitter_eps: multiplicative uniform noise U(1-eps, 1+eps) on the router *input*, training only (Switch).
        noisy_gating: Shazeer et al. 2017 noisy top-k: ``logits + N(0,1) * softplus(x @ W_noise)`` in training,
            top-k on the noisy logits and a softmax over the k kept values only. ``W_noise`` starts at zero.
        batch_priority: batch-priority routing (Riquelme et al. 2021): within a choice rank, tokens with the
            highest top-1 probability claim capacity first. Non-causal: models refuse it in a causal LM.
        second_expert_policy: "all" keeps every choice; "random" keeps choices after the first with probability
            ``min(1, gate / second_expert_threshold)`` during training (Mesh-TF, ST-MoE appendix G).
        second_expert_threshold: the threshold of the "random" policy (0.2).
        init_scale: Switch init scale for ``weight`` (std = sqrt(init_scale / d_model)).
        router_dtype: "float32" (default, always correct) or "bfloat16" (only to reproduce Switch Table 2).
        capacity_factor: CF of the capacity ``C = max(min_capacity, ceil(CF * k * T / E))`` per group of T tokens,
            stored in the decision for the dispatcher; None (default) is dropless.
        min_capacity: lower bound on C.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        *,
        normalize_gates: bool | None = None,
        jitter_eps: float = 0.0,
        noisy_gating: bool = False,
        batch_priority: bool = False,
        second_expert_policy: str = "all",
        second_expert_threshold: float = 0.2,
        init_scale: float = 0.1,
        router_dtype: str = "float32",
        capacity_factor: float | None = None,
        min_capacity: int = 4,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        if second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, got {second_expert_policy!r}"
            )
        if second_expert_threshold <= 0:
            raise ValueError(f"second_expert_threshold must be > 0, got {second_expert_threshold}")
        if router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype must be one of {tuple(ROUTER_DTYPES)}, got {router_dtype!r}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_gates = (top_k > 1) if normalize_gates is None else bool(normalize_gates)
        self.jitter_eps = float(jitter_eps)
        self.noisy_gating = bool(noisy_gating)
        self.batch_priority = bool(batch_priority)
        self.second_expert_policy = second_expert_policy
        self.second_expert_threshold = float(second_expert_threshold)
        self.init_scale = float(init_scale)
        self.router_dtype = router_dtype
        self.capacity_factor = capacity_factor
        self.min_capacity = int(min_capacity)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noisy_gating else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        switch_init_(self.weight, fan_in=self.d_model, init_scale=self.init_scale)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x: Tensor) -> TokenChoiceDecision:
        """Route ``x_GTD`` (G routing groups of T tokens) or ``x_SD`` (one group). Any float dtype; all routing math
        runs in ``router_dtype``."""
        G, T = (1, x.shape[0]) if x.dim() == 2 else (x.shape[0], x.shape[1])
        x_SD = x.reshape(G * T, x.shape[-1])
        dtype = ROUTER_DTYPES[self.router_dtype]
        h_SD = x_SD.to(dtype)
        if self.training and self.jitter_eps > 0:
            # Multiplicative jitter on the router input, not on the logits (Switch, Mesh-TF).
            noise_SD = torch.empty_like(h_SD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            h_SD = h_SD * noise_SD
        logits_SE = _router_logits(h_SD, self.weight, dtype)
        # Softmax BEFORE top-k (Switch / GShard), over all experts; float32 unless bf16 was asked for.
        probs_SE = torch.softmax(logits_SE, dim=-1)

        if self.noisy_gating:
            noisy_SE = logits_SE
            if self.training:
                noise_std_SE = F.softplus(_router_logits(h_SD, self.noise_weight, dtype))
                noisy_SE = logits_SE + torch.randn_like(logits_SE) * noise_std_SE
            top_vals_SK, expert_ids_SK = torch.topk(noisy_SE, self.top_k, dim=-1)
            # Shazeer 2017: the softmax runs over the k kept (noisy) logits only.
            gates_SK = torch.softmax(top_vals_SK, dim=-1)
        else:
            gates_SK, expert_ids_SK = torch.topk(probs_SE, self.top_k, dim=-1)
            if self.normalize_gates:
                gates_SK = gates_SK / (gates_SK.sum(dim=-1, keepdim=True) + 1e-9)

        valid_SK = None
        if self.training and self.second_expert_policy == "random" and self.top_k > 1:
            keep_prob_SK = (gates_SK[:, 1:] / self.second_expert_threshold).clamp(max=1.0)
            keep_rest_SK = torch.rand_like(keep_prob_SK) < keep_prob_SK
            first_S1 = torch.ones_like(keep_rest_SK[:, :1])
            valid_SK = torch.cat([first_S1, keep_rest_SK], dim=-1)

        priority_S = None
        if self.batch_priority:
            # Highest top-1 probability first; a stable sort keeps group order among ties. The key is the router
            # probability of the first choice, not gates_SK[:, 0]: renormalised top-k gates (or noisy-gating gates)
            # would order tokens differently.
            top1_prob_S = probs_SE.gather(-1, expert_ids_SK[:, :1]).squeeze(-1).float()
            priority_S = torch.sort(top1_prob_S, descending=True, stable=True).indices

        return TokenChoiceDecision(
            expert_ids_SK=expert_ids_SK,
            gates_SK=gates_SK.float(),
            probs_SE=probs_SE.float(),
            logits_SE=logits_SE.float(),
            valid_SK=valid_SK,
            priority_S=priority_S,
            capacity=token_choice_capacity(T, self.num_experts, self.top_k, self.capacity_factor, self.min_capacity),
            num_groups=G,
        )
