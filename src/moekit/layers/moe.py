"""The sparse MoE layer: a token-choice or expert-choice router over a stacked expert bank.

Shape legend: S tokens of the call, G routing groups of T tokens, D model width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.experts.bank import ExpertBank
from moekit.init import switch_init_
from moekit.layers.aux import MoEAux
from moekit.layers.config import MoEConfig
from moekit.layers.dense import DenseFFN
from moekit.layers.sparse import SparseFFN
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.topk import TopKRouter

__all__ = ["MoE"]


class MoE(SparseFFN):
    """A Mixture-of-Experts feed-forward layer.

    ``layer(x)`` takes ``[..., d_model]`` and returns ``(y, aux)`` with ``y`` of the same shape and ``aux`` a
    :class:`MoEAux`. Token choice routes all tokens of a call as one group unless ``config.group_size`` is set.

    Attributes:
        router: :class:`TopKRouter` or :class:`ExpertChoiceRouter` (parameter ``weight`` ``[E, D]``).
        experts: :class:`ExpertBank` (``w_in``, ``w_out``, ``w_gate``).
        dispatcher: moves tokens to the experts; swapped for an expert-parallel one in distributed runs (any
            router: see :class:`~moekit.layers.sparse.SparseFFN`).
        shared_experts: :class:`DenseFFN` of the ``num_shared_experts`` always-active experts, or None; its output
            is added to the routed output (times ``sigmoid(shared_expert_gate(x))`` when that gate is on).
        shared_expert_gate: ``nn.Linear(d_model, 1, bias=False)`` or None.
    """

    def __init__(self, config: MoEConfig) -> None:
        if not isinstance(config, MoEConfig):
            raise ValueError(f"MoE expects a MoEConfig, got {type(config).__name__}")
        super().__init__(config.num_experts)
        self.config = config
        c = config
        if c.router == "topk":
            self.router: nn.Module = TopKRouter(
                c.d_model,
                c.num_experts,
                c.top_k,
                normalize_gates=c.normalize_gates,
                jitter_eps=c.jitter_eps,
                noisy_gating=c.noisy_gating,
                batch_priority=c.batch_priority,
                second_expert_policy=c.second_expert_policy,
                second_expert_threshold=c.second_expert_threshold,
                init_scale=c.init_scale,
                router_dtype=c.router_dtype,
                capacity_factor=c.capacity_factor,
                eval_capacity_factor=c.eval_capacity_factor,
                min_capacity=c.min_capacity,
                score_func=c.score_func,
                routed_scaling_factor=c.routed_scaling_factor,
                expert_bias=c.expert_bias,
                bias_update_rate=c.bias_update_rate,
                num_expert_groups=c.num_expert_groups,
                topk_groups=c.topk_groups,
            )
        else:
            self.router = ExpertChoiceRouter(
                c.d_model, c.num_experts, c.capacity_factor, init_scale=c.init_scale
            )
        self.experts = ExpertBank(
            c.num_experts, c.d_model, c.d_ff, c.activation, init_scale=c.init_scale, dropout=c.expert_dropout
        )
        # Always-active experts (DeepSeek, Qwen2-MoE): one dense FFN whose hidden width is all of theirs together
        # (a sum of FFNs is one FFN over the concatenated hidden units), replicated under expert parallelism.
        self.shared_experts = (
            DenseFFN(c.d_model, c.shared_hidden, c.activation, init_scale=c.init_scale, dropout=c.expert_dropout)
            if c.num_shared_experts
            else None
        )
        self.shared_expert_gate = nn.Linear(c.d_model, 1, bias=False) if c.shared_expert_gate else None
        if self.shared_expert_gate is not None:
            switch_init_(self.shared_expert_gate.weight, fan_in=c.d_model, init_scale=c.init_scale)

    def _groups(self, S: int) -> int:
        gs = self.config.group_size
        if gs is None:
            return 1
        if S % gs != 0:
            raise ValueError(f"the number of tokens ({S}) must be a multiple of group_size={gs}")
        return S // gs

    def forward(
        self, x: Tensor, mask: Tensor | None = None, replay: Tensor | None = None
    ) -> tuple[Tensor, MoEAux]:
        """``x`` ``[..., d_model]``; ``mask`` (bool ``x.shape[:-1]``, True = real token, token choice only) keeps
        padding out of capacity, losses, statistics and the balancing loads; padding gets no routed output (its
        output is the shared experts' alone, or 0). ``replay`` (int64 ``[tokens, k]``, an earlier call's
        ``aux.routing.expert_ids_SK``) forces those experts, with gates recomputed from this call's router, so a
        second pass routes exactly as the first (reinforcement-learning fine-tuning) and still trains the router."""
        D = self.config.d_model
        if x.dim() < 1 or x.shape[-1] != D:
            raise ValueError(f"input width must equal d_model={D}, got shape {tuple(x.shape)}")
        x_SD = x.reshape(-1, D)
        if x_SD.shape[0] == 0:
            raise ValueError("MoE got an input with no tokens")
        if (mask is not None or replay is not None) and self.config.router != "topk":
            raise ValueError("a token mask and routing replay are supported for router='topk' only")
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask must have shape {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
        balance = self.config.balance_loss
        # DeepSeek-V3's sequence-wise balance: one balance group per sequence (row of a [..., T, D] input).
        sequences = (x_SD.shape[0] // x.shape[-2] if x.dim() >= 3 else 1) if balance == "sequence" else None
        G = self._groups(x_SD.shape[0])
        mask_GT = None if mask is None else mask.reshape(G, -1)
        y_SD, aux = self.route(
            x_SD.reshape(G, -1, D), mask_GT, balance_groups=sequences, balance_global=balance == "global",
            forced_ids=replay,
        )
        if self.shared_experts is not None:
            shared_SD, _ = self.shared_experts(x_SD)
            if self.shared_expert_gate is not None:
                shared_SD = torch.sigmoid(self.shared_expert_gate(x_SD)) * shared_SD
            y_SD = y_SD + shared_SD.to(y_SD.dtype)
        return y_SD.view(*x.shape[:-1], y_SD.shape[-1]), aux
