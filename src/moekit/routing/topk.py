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

__all__ = ["TopKRouter", "SCORE_FUNCS", "SECOND_EXPERT_POLICIES", "ROUTER_DTYPES", "token_choice_capacity"]

SCORE_FUNCS = ("softmax", "sigmoid")
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
        eval_capacity_factor: the CF in eval mode (Switch trains at 1.0-1.25 and evaluates at 2.0); None: the
            training value.
        min_capacity: lower bound on C.
        score_func: "softmax" over experts, or "sigmoid" per expert (DeepSeek-V3). With sigmoid the balance loss
            and the router statistics use the scores normalised to sum 1 over experts.
        routed_scaling_factor: multiplies the gates, after renormalisation and the second-expert policy.
        expert_bias: keep a per-expert bias ``expert_bias`` ``[E]`` (float32 buffer, saved with the model) added to
            the scores when choosing experts, never to the gates (loss-free balancing).
        bias_update_rate: u of :func:`moekit.routing.update_expert_bias`; > 0 also counts, during training, the
            choices each expert gets (``expert_load``, not saved) for that update.
        num_expert_groups: G equal groups of experts; each is scored by the sum of its two best (biased) scores and
            only the ``topk_groups`` best groups' experts can be chosen (DeepSeek-V3).
        topk_groups: groups eligible per token (None: all).
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
        score_func: str = "softmax",
        eval_capacity_factor: float | None = None,
        routed_scaling_factor: float = 1.0,
        expert_bias: bool = False,
        bias_update_rate: float = 0.0,
        num_expert_groups: int = 1,
        topk_groups: int | None = None,
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
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if num_expert_groups < 1 or num_experts % num_expert_groups != 0:
            raise ValueError(f"num_expert_groups must divide num_experts={num_experts}, got {num_expert_groups}")
        topk_groups = num_expert_groups if topk_groups is None else topk_groups
        if not 1 <= topk_groups <= num_expert_groups:
            raise ValueError(f"topk_groups must be in [1, num_expert_groups={num_expert_groups}], got {topk_groups}")
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
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = int(min_capacity)
        self.score_func = score_func
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.bias_update_rate = float(bias_update_rate)
        self.num_expert_groups = int(num_expert_groups)
        self.topk_groups = int(topk_groups)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noisy_gating else None
        self.expert_bias: Tensor | None
        self.expert_load: Tensor | None
        if expert_bias or bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        if bias_update_rate > 0:
            # Choices per expert since the last bias update; a running count, not part of the model's state.
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        else:
            self.expert_load = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        switch_init_(self.weight, fan_in=self.d_model, init_scale=self.init_scale)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def choice_scores(self, scores_SE: Tensor) -> Tensor:
        """The scores experts are chosen by: ``scores + expert_bias``, and, with groups, -inf outside each token's
        ``topk_groups`` best groups (a group's score: the sum of its two best biased scores)."""
        choice_SE = scores_SE if self.expert_bias is None else scores_SE + self.expert_bias.to(scores_SE.dtype)
        G = self.num_expert_groups
        if G == 1:
            return choice_SE
        S, E = choice_SE.shape
        choice_SGX = choice_SE.view(S, G, E // G)
        group_score_SG = choice_SGX.topk(2, dim=-1).values.sum(dim=-1)
        best_groups_SK = group_score_SG.topk(self.topk_groups, dim=-1).indices
        eligible_SG = torch.zeros_like(group_score_SG, dtype=torch.bool).scatter_(1, best_groups_SK, True)
        return choice_SGX.masked_fill(~eligible_SG.unsqueeze(-1), float("-inf")).view(S, E)

    def _capacity_factor(self) -> float | None:
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def forward(
        self, x: Tensor, mask: Tensor | None = None, forced_ids: Tensor | None = None
    ) -> TokenChoiceDecision:
        """Route ``x_GTD`` (G routing groups of T tokens) or ``x_SD`` (one group). Any float dtype; all routing math
        runs in ``router_dtype``. ``mask`` (bool, ``x.shape[:-1]``, True = real token): padding's choices are
        declined, so it takes no capacity slot, gets no routed output and counts in no loss, statistic or load.

        ``forced_ids`` (int64 ``[S, k]``, e.g. an earlier call's ``expert_ids_SK``) replays a routing: the experts
        are those, the gates are recomputed from this call's scores (so gradients reach the router), exactly as
        if the router had chosen them. Noise and the second-expert policy's draws are not replayed."""
        G, T = (1, x.shape[0]) if x.dim() == 2 else (x.shape[0], x.shape[1])
        x_SD = x.reshape(G * T, x.shape[-1])
        dtype = ROUTER_DTYPES[self.router_dtype]
        h_SD = x_SD.to(dtype)
        if self.training and self.jitter_eps > 0:
            # Multiplicative jitter on the router input, not on the logits (Switch, Mesh-TF).
            noise_SD = torch.empty_like(h_SD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            h_SD = h_SD * noise_SD
        logits_SE = _router_logits(h_SD, self.weight, dtype)
        if self.score_func == "softmax":
            # Softmax BEFORE top-k (Switch / GShard), over all experts; float32 unless bf16 was asked for.
            scores_SE = probs_SE = torch.softmax(logits_SE, dim=-1)
        else:
            # An independent score per expert (DeepSeek-V3); the balance loss and the statistics read the scores
            # normalised over experts, as DeepSeek-V3's sequence-wise balance loss does.
            scores_SE = torch.sigmoid(logits_SE)
            probs_SE = scores_SE / scores_SE.sum(dim=-1, keepdim=True)

        if forced_ids is not None:
            if forced_ids.shape != (G * T, self.top_k):
                raise ValueError(
                    f"forced_ids must have shape [{G * T}, {self.top_k}], got {tuple(forced_ids.shape)}"
                )
            expert_ids_SK = forced_ids.to(device=scores_SE.device, dtype=torch.int64)
            gates_SK = scores_SE.gather(-1, expert_ids_SK)
        elif self.noisy_gating:
            noisy_SE = logits_SE
            if self.training:
                noise_std_SE = F.softplus(_router_logits(h_SD, self.noise_weight, dtype))
                noisy_SE = logits_SE + torch.randn_like(logits_SE) * noise_std_SE
            top_vals_SK, expert_ids_SK = torch.topk(noisy_SE, self.top_k, dim=-1)
            # Shazeer 2017: the softmax runs over the k kept (noisy) logits only.
            gates_SK = torch.softmax(top_vals_SK, dim=-1)
        elif self.expert_bias is None and self.num_expert_groups == 1:
            gates_SK, expert_ids_SK = torch.topk(scores_SE, self.top_k, dim=-1)
        else:
            # Choose by the biased, group-limited scores; gate by the plain scores (the bias only balances).
            _, expert_ids_SK = torch.topk(self.choice_scores(scores_SE), self.top_k, dim=-1)
            gates_SK = scores_SE.gather(-1, expert_ids_SK)
        if (forced_ids is not None or not self.noisy_gating) and self.normalize_gates:
            gates_SK = gates_SK / (gates_SK.sum(dim=-1, keepdim=True) + 1e-9)

        valid_SK = None
        if self.training and self.second_expert_policy == "random" and self.top_k > 1:
            keep_prob_SK = (gates_SK[:, 1:] / self.second_expert_threshold).clamp(max=1.0)
            keep_rest_SK = torch.rand_like(keep_prob_SK) < keep_prob_SK
            first_S1 = torch.ones_like(keep_rest_SK[:, :1])
            valid_SK = torch.cat([first_S1, keep_rest_SK], dim=-1)
        mask_S = None
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask must have shape {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
            mask_S = mask.reshape(G * T).to(torch.bool)
            mask_SK = mask_S.unsqueeze(1).expand(-1, self.top_k)
            valid_SK = mask_SK if valid_SK is None else valid_SK & mask_SK

        if self.routed_scaling_factor != 1.0:
            gates_SK = gates_SK * self.routed_scaling_factor

        priority_S = None
        if self.batch_priority:
            # Highest top-1 probability first; a stable sort keeps group order among ties. The key is the router
            # probability of the first choice, not gates_SK[:, 0]: renormalised top-k gates (or noisy-gating gates)
            # would order tokens differently.
            top1_prob_S = probs_SE.gather(-1, expert_ids_SK[:, :1]).squeeze(-1).float()
            priority_S = torch.sort(top1_prob_S, descending=True, stable=True).indices

        decision = TokenChoiceDecision(
            expert_ids_SK=expert_ids_SK,
            gates_SK=gates_SK.float(),
            probs_SE=probs_SE.float(),
            logits_SE=logits_SE.float(),
            valid_SK=valid_SK,
            priority_S=priority_S,
            capacity=token_choice_capacity(T, self.num_experts, self.top_k, self._capacity_factor(), self.min_capacity),
            num_groups=G,
            mask_S=mask_S,
        )
        if self.expert_load is not None and self.training:
            self.expert_load += decision.router_load()  # the balancing load: this step's choices, all calls
        return decision
