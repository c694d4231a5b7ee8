"""Expert-parallel training on torch.distributed: the process group, data split, gradient sync, global metrics.

Why a manual all-reduce rather than DDP: the model holds two kinds of parameters. Expert weights live on one rank
each and already receive every rank's gradient through the all-to-all backward; everything else is replicated and
must be averaged. Each rank back-propagates ``loss_local / ep`` (its share of the global mean), so expert gradients
are exact as they arrive and replicated gradients become exact after one SUM all-reduce, without DDP's hooks having
to skip the expert parameters. The gradient norm for clipping adds the replicated part once and every rank's expert
part, so clipping is that of the single-process run.

Every method is collective: all ranks call them in the same order.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.errors import MoekitError
from moekit.layers.expert_parallel import expert_parameters, is_expert_parallel, shard_experts_, unshard_experts_

__all__ = ["ExpertParallel", "init_expert_parallel", "launch_world_size"]


def launch_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_expert_parallel(expert_parallel: int, timeout_s: float) -> bool:
    """Join (or check) the default process group for ``expert_parallel`` ranks. Returns whether it is distributed.

    A collective that waits longer than ``timeout_s`` (a rank died or hangs) raises instead of blocking forever.
    """
    if expert_parallel == 1:
        if launch_world_size() > 1:
            raise MoekitError(
                f"started with {launch_world_size()} processes but parallel.expert_parallel = 1; "
                f"pass --set parallel.expert_parallel={launch_world_size()}"
            )
        return False
    if not dist.is_initialized():
        if launch_world_size() != expert_parallel:
            raise MoekitError(
                f"parallel.expert_parallel = {expert_parallel} needs {expert_parallel} processes: launch with "
                f"torchrun --nproc_per_node {expert_parallel} -m moekit train ... (got WORLD_SIZE="
                f"{launch_world_size()})"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != expert_parallel:
        raise MoekitError(
            f"parallel.expert_parallel = {expert_parallel} but the process group has {dist.get_world_size()} ranks"
        )
    return True


class ExpertParallel:
    """The expert-parallel side of one training run: which rank this is, and the collectives the trainer needs."""

    def __init__(self, model: nn.Module, group=None) -> None:
        self.model = model
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._expert_ids = {id(p) for p in expert_parameters(model)}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- experts ---------------------------------------------------------------------------------------------
    def shard(self, optimizer: torch.optim.Optimizer) -> None:
        if not is_expert_parallel(self.model):
            shard_experts_(self.model, optimizer, self.group)
            if hasattr(optimizer, "sharded"):  # Adafactor: update clipping over the whole expert stack
                optimizer.sharded.update({i: self.group for i in self._expert_ids})

    def unshard(self, optimizer: torch.optim.Optimizer) -> None:
        if is_expert_parallel(self.model):
            unshard_experts_(self.model, optimizer, self.group)
            if hasattr(optimizer, "sharded"):
                optimizer.sharded.clear()

    # -- data ------------------------------------------------------------------------------------------------
    def local_rows(self, batch_BT: Tensor) -> Tensor:
        """This rank's share of a global batch: consecutive rows, as equal as the batch size allows."""
        return torch.tensor_split(batch_BT, self.world)[self.rank]

    # -- gradients -------------------------------------------------------------------------------------------
    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """SUM-all-reduce the replicated parameters' gradients (each rank back-propagated loss / ep).

        A missing gradient becomes zeros first: experts that received no rows on this rank have none, while the
        single-process bank (one grouped matmul over all experts) gets zeros, which the optimizer does apply
        (moments, weight decay); and every rank must all-reduce buffers of the same size.
        """
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if id(p) not in self._expert_ids]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def clip_gradients(self, params: list[nn.Parameter], bound: float) -> float:
        """Global gradient norm over every parameter of the whole model (replicated ones counted once), clipped
        to ``bound`` as ``torch.nn.utils.clip_grad_norm_`` does. Returns the norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        replicated = [p.grad for p in params if p.grad is not None and id(p) not in self._expert_ids]
        experts = [p.grad for p in params if p.grad is not None and id(p) in self._expert_ids]
        sq = torch.zeros(2, dtype=torch.float64)
        if replicated:
            sq[0] = sum(float(g.detach().double().pow(2).sum()) for g in replicated)
        if experts:
            sq[1] = sum(float(g.detach().double().pow(2).sum()) for g in experts)
        dist.all_reduce(sq[1:], group=self.group)
        total = math.sqrt(float(sq.sum()))
        if math.isfinite(total) and bound < math.inf:
            coef = min(1.0, bound / (total + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return total

    # -- values ----------------------------------------------------------------------------------------------
    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return (t / self.world).tolist()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        """The maximum over ranks of each value."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (e.g. a decision that reads the file system)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)
