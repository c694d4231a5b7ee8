"""The routed feed-forward layer every sparse layer is: router -> plan -> dispatcher -> experts -> combine.

:class:`~moekit.layers.moe.MoE` (token choice, expert choice) and :class:`~moekit.layers.soft_moe.SoftMoE` differ
only in their router and in how a call's tokens form routing groups; everything after the router is this one path,
with no per-router branch. Swapping ``dispatcher`` for an expert-parallel one therefore works for every router.

Shape legend: G routing groups of T tokens, S = G * T tokens, D model width, A rows for the expert bank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.dispatch.plan import Dispatcher, LocalDispatcher, plan_routing
from moekit.experts.bank import ExpertBank
from moekit.layers.aux import MoEAux

__all__ = ["SparseFFN", "compute_dtype"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: the autocast dtype when autocast is on, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class SparseFFN(nn.Module):
    """Base of the routed layers. Subclasses set ``router`` (returns a routing decision for ``[G, T, D]``) and
    ``experts`` (an :class:`ExpertBank` of ``num_experts``), and reshape their input into routing groups for
    :meth:`route`.

    Attributes:
        dispatcher: moves the plan's rows to the experts and back; an expert-parallel one in distributed runs.
    """

    router: nn.Module
    experts: ExpertBank
    num_experts: int

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dispatcher: Dispatcher = LocalDispatcher(num_experts)

    def route(
        self, x_GTD: Tensor, mask_GT: Tensor | None = None, *, balance_groups: int | None = None,
        balance_global: bool = False, forced_ids: Tensor | None = None,
    ) -> tuple[Tensor, MoEAux]:
        """Route G groups of T tokens through the experts: ``([G * T, D], aux)``. ``mask_GT`` (True = real
        token), ``balance_groups`` and ``balance_global`` (how the balance loss groups its counts) and
        ``forced_ids`` (a routing to replay) are for token-choice routers."""
        G, T, D = x_GTD.shape
        router_kwargs = {}
        if mask_GT is not None:
            router_kwargs["mask"] = mask_GT
        if forced_ids is not None:
            router_kwargs["forced_ids"] = forced_ids
        # Routers see the input as it is (they pick their own precision).
        decision = self.router(x_GTD, **router_kwargs)
        if balance_groups is not None or balance_global:
            decision.balance_groups, decision.balance_global = balance_groups, balance_global
        plan = plan_routing(decision, self.num_experts)
        x_SD = x_GTD.reshape(G * T, D).to(compute_dtype(x_GTD))
        rows = self.dispatcher.dispatch(x_SD, plan)
        y_AD = self.experts(rows.x_AD, rows.tokens_per_expert_E, rows.rows_per_expert)
        y_SD = self.dispatcher.combine(y_AD, rows)
        return y_SD, MoEAux.from_routing(decision, plan)
