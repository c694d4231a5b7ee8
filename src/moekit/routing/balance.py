"""Loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts";
DeepSeek-V3 section 2.1.2): a per-expert bias, added to the scores only when choosing experts, is nudged after every
optimizer step toward balance, with no gradient and no auxiliary loss.

    b_i <- b_i + u * sign(mean_j load_j - load_i)

``load_i`` counts the choices expert i received since the last update (every training forward of the router, all
micro-batches), summed over all ranks of the process group, so every rank applies the same update and the biases
stay identical. The bias never enters a gate, so the model's output for a given choice of experts is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.routing.topk import TopKRouter

__all__ = ["balancing_routers", "reset_expert_load", "update_expert_bias"]


def balancing_routers(model: nn.Module) -> list[TopKRouter]:
    """The routers of ``model`` that do loss-free balancing (``bias_update_rate > 0``), in module order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_load is not None]


@torch.no_grad()
def update_expert_bias(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Apply one loss-free balancing update to every balancing router of ``model`` and reset their load counts.

    Call it after each optimizer step (``moekit``'s Trainer does). Under torch.distributed the loads are summed over
    ``group`` (default: the default process group) with one all-reduce, so it is collective: every rank calls it.
    Returns the number of routers updated.
    """
    routers = balancing_routers(model)
    if not routers:
        return 0
    loads = torch.cat([r.expert_load for r in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads, group=group)
    offset = 0
    for r in routers:
        load_E = loads[offset:offset + r.num_experts]
        offset += r.num_experts
        r.expert_bias += r.bias_update_rate * torch.sign(load_E.mean() - load_E)
        r.expert_load.zero_()
    return len(routers)


def reset_expert_load(model: nn.Module) -> None:
    """Forget the loads counted since the last update (a skipped optimizer step must not move the biases)."""
    for r in balancing_routers(model):
        r.expert_load.zero_()
