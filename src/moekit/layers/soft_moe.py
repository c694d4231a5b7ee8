"""Soft MoE layer (Puigcerver et al. 2023): experts process slots that are soft mixtures of a group's tokens.

Shape legend: B groups (one per row of the batch), M tokens per group, D model width, E experts, P slots per expert.
"""

from __future__ import annotations

from torch import Tensor

from moekit.experts.bank import ExpertBank
from moekit.layers.aux import MoEAux
from moekit.layers.config import SoftMoEConfig
from moekit.layers.sparse import SparseFFN
from moekit.routing.soft import SoftRouter

__all__ = ["SoftMoE"]


class SoftMoE(SparseFFN):
    """Soft MoE. Takes ``[..., M, d_model]`` (each row of M tokens is one group; a 2-D input is one group) and
    returns ``(y, aux)``. No token is ever dropped and no example affects another.

    Attributes:
        router: :class:`SoftRouter` with ``phi`` ``[D, E, P]`` and ``scale``.
        experts: :class:`ExpertBank`; it runs the ``E * P`` slots of every group (see
            :class:`~moekit.dispatch.soft.SoftPlan`).
        dispatcher: as for :class:`~moekit.layers.moe.MoE`; Soft MoE works under expert parallelism too.
    """

    def __init__(self, config: SoftMoEConfig) -> None:
        if not isinstance(config, SoftMoEConfig):
            raise ValueError(f"SoftMoE expects a SoftMoEConfig, got {type(config).__name__}")
        super().__init__(config.num_experts)
        self.config = config
        c = config
        self.router = SoftRouter(c.d_model, c.num_experts, c.slots_per_expert, scale_init=c.router_scale_init)
        self.experts = ExpertBank(
            c.num_experts, c.d_model, c.d_ff, c.activation, init_scale=c.init_scale, dropout=c.expert_dropout
        )

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        D = self.config.d_model
        if x.dim() < 2 or x.shape[-1] != D:
            raise ValueError(f"SoftMoE expects [..., M, d_model={D}], got shape {tuple(x.shape)}")
        M = x.shape[-2]
        if M == 0:
            raise ValueError("SoftMoE got a group with no tokens")
        y_SD, aux = self.route(x.reshape(-1, M, D))  # each row of M tokens is one routing group
        return y_SD.view(*x.shape[:-1], D), aux
