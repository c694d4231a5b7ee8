"""The sparse MoE layer: router + dispatcher + expert bank (token choice or expert choice).

Shape legend: S tokens of the call, G routing groups of T tokens, D model width, E experts, K choices per token,
A kept assignments, C tokens per expert per group (expert choice).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.dispatch.local import LocalDispatcher, token_choice_capacity
from moekit.experts.bank import ExpertBank
from moekit.layers.aux import MoEAux, router_entropy
from moekit.layers.config import MoEConfig
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.losses import load_balancing_loss, router_z_loss
from moekit.routing.topk import TopKRouter

__all__ = ["MoE"]


def _autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts should compute in: the autocast dtype when autocast is on, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    ``layer(x)`` takes ``[..., d_model]`` and returns ``(y, aux)`` with ``y`` of the same shape and ``aux`` a
    :class:`MoEAux`. Token choice routes all tokens of a call as one group unless ``config.group_size`` is set.

    Attributes:
        router: :class:`TopKRouter` or :class:`ExpertChoiceRouter` (parameter ``weight`` ``[E, D]``).
        experts: :class:`ExpertBank` (``w_in``, ``w_out``, ``w_gate``).
        dispatcher: moves tokens to the experts; swapped for an expert-parallel one in distributed runs.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"MoE expects a MoEConfig, got {type(config).__name__}")
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
            )
        else:
            self.router = ExpertChoiceRouter(
                c.d_model, c.num_experts, c.capacity_factor, init_scale=c.init_scale
            )
        self.experts = ExpertBank(
            c.num_experts, c.d_model, c.d_ff, c.activation, init_scale=c.init_scale, dropout=c.expert_dropout
        )
        self.dispatcher = LocalDispatcher(c.num_experts)

    def _groups(self, S: int) -> int:
        gs = self.config.group_size
        if gs is None:
            return 1
        if S % gs != 0:
            raise ValueError(f"the number of tokens ({S}) must be a multiple of group_size={gs}")
        return S // gs

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        D = self.config.d_model
        if x.dim() < 1 or x.shape[-1] != D:
            raise ValueError(f"input width must equal d_model={D}, got shape {tuple(x.shape)}")
        x_SD = x.reshape(-1, D)
        if x_SD.shape[0] == 0:
            raise ValueError("MoE got an input with no tokens")
        num_groups = self._groups(x_SD.shape[0])
        if self.config.router == "topk":
            y_SD, aux = self._token_choice(x_SD, num_groups)
        else:
            y_SD, aux = self._expert_choice(x_SD, num_groups)
        return y_SD.view(*x.shape[:-1], y_SD.shape[-1]), aux

    def _token_choice(self, x_SD: Tensor, num_groups: int) -> tuple[Tensor, MoEAux]:
        c = self.config
        S = x_SD.shape[0]
        decision = self.router(x_SD)
        capacity = token_choice_capacity(S // num_groups, c.num_experts, c.top_k, c.capacity_factor, c.min_capacity)
        x_run = x_SD.to(_autocast_dtype(x_SD))
        x_AD, tokens_per_expert_E, state = self.dispatcher.dispatch(x_run, decision, capacity, num_groups)
        y_AD = self.experts(x_AD, tokens_per_expert_E)
        y_SD = self.dispatcher.combine(y_AD, state)
        aux = MoEAux(
            load_balancing_loss=load_balancing_loss(
                decision.probs_SE, decision.expert_ids_SK, c.num_experts, num_groups=num_groups
            ),
            z_loss=router_z_loss(decision.logits_SE),
            # The plan's counts are this call's loads over all E experts; under expert parallelism the dispatcher
            # returns the rows its local experts received instead, so read them from the plan.
            tokens_per_expert=state.plan.tokens_per_expert_E.detach(),
            drop_fraction=torch.tensor(state.plan.drop_fraction, dtype=torch.float32),
            router_entropy=router_entropy(decision.probs_SE),
            max_logit=decision.logits_SE.detach().max(),
            routing=decision,
            plan=state.plan,
        )
        return y_SD, aux

    def _expert_choice(self, x_SD: Tensor, num_groups: int) -> tuple[Tensor, MoEAux]:
        S, D = x_SD.shape
        T = S // num_groups
        decision = self.router(x_SD.view(num_groups, T, D))
        G, E, C = decision.token_ids_GEC.shape
        # Token index in the flat call; lay the picks out expert-major: [E, G*C].
        global_ids_GEC = decision.token_ids_GEC + (torch.arange(G, device=x_SD.device) * T).view(G, 1, 1)
        ids_EN = global_ids_GEC.permute(1, 0, 2).reshape(E, G * C)
        gates_EN = decision.gates_GEC.permute(1, 0, 2).reshape(E, G * C)
        x_run = x_SD.to(_autocast_dtype(x_SD))
        x_END = x_run.index_select(0, ids_EN.reshape(-1)).view(E, G * C, D)
        y_END = self.experts.forward_slots(x_END)
        weighted_ND = (y_END * gates_EN.unsqueeze(-1).to(y_END.dtype)).reshape(E * G * C, D)
        y_SD = y_END.new_zeros(S, D).index_add(0, ids_EN.reshape(-1), weighted_ND)
        chosen_S = torch.zeros(S, dtype=torch.bool, device=x_SD.device)
        chosen_S[ids_EN.reshape(-1)] = True
        zero = torch.zeros((), dtype=torch.float32, device=x_SD.device)
        aux = MoEAux(
            load_balancing_loss=zero,  # balanced by construction: no balance loss (Zhou et al. 2022)
            z_loss=router_z_loss(decision.logits_SE),
            tokens_per_expert=torch.full((E,), G * C, dtype=torch.int64, device=x_SD.device),
            drop_fraction=1.0 - chosen_S.float().mean(),
            router_entropy=router_entropy(decision.probs_SE),
            max_logit=decision.logits_SE.detach().max(),
            routing=decision,
        )
        return y_SD, aux
