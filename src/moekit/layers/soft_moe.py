"""Soft MoE layer (Puigcerver et al. 2023): experts process slots that are soft mixtures of a group's tokens.

Shape legend: B groups (one per row of the batch), M tokens per group, D model width, E experts, P slots per expert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.experts.bank import ExpertBank
from moekit.layers.aux import MoEAux
from moekit.layers.config import SoftMoEConfig
from moekit.layers.moe import _autocast_dtype
from moekit.routing.soft import SoftRouter

__all__ = ["SoftMoE"]


class SoftMoE(nn.Module):
    """Soft MoE. Takes ``[..., M, d_model]`` (each row of M tokens is one group; a 2-D input is one group) and
    returns ``(y, aux)``. No token is ever dropped and no example affects another.

    Attributes:
        router: :class:`SoftRouter` with ``phi`` ``[D, E, P]`` and ``scale``.
        experts: :class:`ExpertBank`.
    """

    def __init__(self, config: SoftMoEConfig) -> None:
        super().__init__()
        if not isinstance(config, SoftMoEConfig):
            raise ValueError(f"SoftMoE expects a SoftMoEConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.router = SoftRouter(c.d_model, c.num_experts, c.slots_per_expert)
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
        x_BMD = x.reshape(-1, M, D)
        B = x_BMD.shape[0]
        E, P = self.config.num_experts, self.config.slots_per_expert
        dispatch_BMEP, combine_BMEP, logits_BMEP = self.router(x_BMD)
        dtype = _autocast_dtype(x_BMD)
        x_run = x_BMD.to(dtype)
        # Slots are mixes of the ORIGINAL tokens (not the normalised ones used for the logits).
        slots_EBPD = torch.einsum("bmep,bmd->ebpd", dispatch_BMEP.to(dtype), x_run)
        out_END = self.experts.forward_slots(slots_EBPD.reshape(E, B * P, D))
        out_EBPD = out_END.view(E, B, P, D)
        y_BMD = torch.einsum("bmep,ebpd->bmd", combine_BMEP.to(out_EBPD.dtype), out_EBPD)
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        c = combine_BMEP.detach().reshape(B * M, E * P)
        aux = MoEAux(
            load_balancing_loss=zero,
            z_loss=zero,
            tokens_per_expert=torch.full((E,), B * P, dtype=torch.int64, device=x.device),
            drop_fraction=zero,
            router_entropy=-(c * torch.log(c.clamp_min(1e-30))).sum(-1).mean(),
            max_logit=logits_BMEP.detach().max(),
            routing=(dispatch_BMEP.detach(), combine_BMEP.detach()),
        )
        return y_BMD.view(*x.shape[:-1], D), aux
