"""Convert a model's routed layers (MoE with any router, Soft MoE) to expert parallelism and back: slice each
expert bank, swap the dispatcher.

The conversion keeps the same ``nn.Parameter`` objects and only replaces their ``.data`` (and the matching
optimizer state), so an optimizer built on the full model keeps working on the sharded one, and checkpoints are
written from (and loaded into) the full shapes: a run saved with N ranks resumes with any M that divides E.

Every function here is collective: all ranks of the group must call it in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.dispatch.all_to_all import AllToAllDispatcher, local_expert_range
from moekit.dispatch.plan import LocalDispatcher
from moekit.layers.sparse import SparseFFN

__all__ = ["expert_parameters", "is_expert_parallel", "shard_experts_", "unshard_experts_"]


def _moe_layers(model: nn.Module) -> list[SparseFFN]:
    return [m for m in model.modules() if isinstance(m, SparseFFN)]


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether any MoE layer of ``model`` currently runs with an :class:`AllToAllDispatcher`."""
    return any(isinstance(m.dispatcher, AllToAllDispatcher) for m in _moe_layers(model))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every routed layer's expert bank: the ones expert parallelism shards."""
    return [p for m in _moe_layers(model) for p in m.experts.parameters()]


def _bank_params(layer: SparseFFN) -> list[nn.Parameter]:
    return [p for p in (layer.experts.w_in, layer.experts.w_gate, layer.experts.w_out) if p is not None]


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None, p: nn.Parameter, leading: int) -> list[str]:
    """Keys of the optimizer state of ``p`` that are per-expert (leading dimension ``leading``, 2-D or more)."""
    if optimizer is None or p not in optimizer.state:
        return []
    return [
        k
        for k, v in optimizer.state[p].items()
        if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[0] == leading
    ]


def shard_experts_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, group=None) -> int:
    """Keep only this rank's ``E / ep`` experts in every routed layer (and their optimizer state) and swap in an
    :class:`AllToAllDispatcher`. Returns the number of layers converted.

    Every router works: each rank routes its own tokens (its routing groups are its own) and the dispatcher moves
    the plan's rows to the experts' owners. Raises ValueError when E is not divisible by the group size.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    converted = 0
    for layer in _moe_layers(model):
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            continue
        E = layer.num_experts
        first, stop = local_expert_range(E, world, rank)
        for p in _bank_params(layer):
            for k in _optimizer_tensors(optimizer, p, E):
                optimizer.state[p][k] = optimizer.state[p][k][first:stop].clone()
            p.data = p.data[first:stop].clone()
            if p.grad is not None:
                p.grad = None
        layer.experts.num_experts = stop - first
        layer.experts.pair_gate_up_()  # the slices side by side again: one GEMM for gate and up
        layer.dispatcher = AllToAllDispatcher(E, group)
        converted += 1
    return converted


def _gather_rows(local: Tensor, world: int, group) -> Tensor:
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def unshard_experts_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, group=None) -> int:
    """Gather every rank's experts (and their optimizer state) back into full ``[E, ...]`` banks on every rank and
    restore the :class:`LocalDispatcher`. Returns the number of layers converted."""
    world = dist.get_world_size(group)
    converted = 0
    for layer in _moe_layers(model):
        if not isinstance(layer.dispatcher, AllToAllDispatcher):
            continue
        E = layer.num_experts
        L = E // world
        for p in _bank_params(layer):
            for k in _optimizer_tensors(optimizer, p, L):
                optimizer.state[p][k] = _gather_rows(optimizer.state[p][k], world, group)
            p.data = _gather_rows(p.data, world, group)
            if p.grad is not None:
                p.grad = None
        layer.experts.num_experts = E
        layer.experts.pair_gate_up_()
        layer.dispatcher = LocalDispatcher(E)
        converted += 1
    return converted
