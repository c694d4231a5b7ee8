"""Expert- and data-parallel training on torch.distributed: the device mesh, data split, gradient sync, global
metrics.

The ranks form a 2-D mesh ``("dp", "ep")`` of ``data_parallel x expert_parallel`` processes (rank = dp_index x ep +
ep_index, as ``init_device_mesh`` lays it out). Every rank takes ``1 / world`` of each global batch. The experts are
split over the ranks of an ``ep`` group (its all-to-all moves tokens to their experts' owners) and each ``ep`` shard
is replicated over the ``dp`` dimension; every other weight is replicated on all ranks. With ``dp = 1`` this is
plain expert parallelism, with ``ep = 1`` plain data parallelism.

With ``fsdp`` the non-expert weights are not replicated but sharded over all ranks with FSDP2 (``fully_shard`` on a
1-D mesh of the whole run): each rank keeps ``1 / world`` of every such parameter, its gradient and its optimizer
state as ``DTensor`` shards, all-gathers a block's weights just before the block runs and reduce-scatters its
gradients in backward. The expert banks are FSDP's ``ignored_params``: they stay sliced over ``ep`` and replicated
over ``dp`` as above (their all-to-all already spreads them; sharding them over ``dp`` as well would add an
all-gather per layer that only pays when ``dp`` is large). FSDP is applied when the experts are sliced
(:meth:`ExpertParallel.shard`), after the model and optimizer exist: the optimizer keeps its parameter groups and
state, remapped onto the shards.

Why a manual all-reduce rather than DDP: the model holds two kinds of parameters. Each rank back-propagates
``loss_local / world`` (its share of the global mean). An expert weight receives, through the all-to-all backward,
the gradient of every rank of its ``ep`` group; one SUM all-reduce over the ``dp`` group adds the other replicas'
shares, so it becomes exact. A replicated weight becomes exact after one SUM all-reduce over all ranks. DDP's hooks
would have to skip the expert parameters and reduce them over another group. The gradient norm for clipping adds the
replicated part once and the expert part of every rank of one ``ep`` group (the ``dp`` replicas hold the same
gradients), so clipping is that of the single-process run. Under FSDP the reduce-scatter SUMs too (its divide factor
is set to 1: the ``1 / world`` is already in the loss each rank back-propagates), and each rank adds the squares of
its own gradient shards to the norm, summed over all ranks.

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

__all__ = ["ExpertParallel", "fsdp_units", "init_parallel_mesh", "launch_world_size"]


def launch_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards as units before the model itself, innermost first: the model's own
    ``fsdp_units()`` when it has one (a module called from outside its parent's forward needs a unit of its own),
    else every child of each outermost ``ModuleList`` (the blocks)."""
    own = getattr(model, "fsdp_units", None)
    if callable(own):
        return list(own())
    units: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(u + ".") for u in units)
        if isinstance(module, nn.ModuleList) and not inside:
            units += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return [model.get_submodule(u) for u in units]


def init_parallel_mesh(data_parallel: int, expert_parallel: int, timeout_s: float):
    """Join (or check) the default process group for ``data_parallel x expert_parallel`` ranks and return the
    ``("dp", "ep")`` device mesh over it; None for one process. A collective that waits longer than ``timeout_s``
    raises instead of blocking forever."""
    world = data_parallel * expert_parallel
    if world == 1:
        if launch_world_size() > 1:
            raise MoekitError(
                f"started with {launch_world_size()} processes but parallel.data_parallel x expert_parallel = 1; "
                f"pass --set parallel.expert_parallel=... / parallel.data_parallel=... with a product of "
                f"{launch_world_size()}"
            )
        return None
    if not dist.is_initialized():
        if launch_world_size() != world:
            raise MoekitError(
                f"parallel.data_parallel x expert_parallel = {data_parallel} x {expert_parallel} needs {world} "
                f"processes: launch with torchrun --nproc_per_node {world} -m moekit train ... (got WORLD_SIZE="
                f"{launch_world_size()})"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != world:
        raise MoekitError(
            f"parallel.data_parallel x expert_parallel = {world} but the process group has {dist.get_world_size()} "
            "ranks"
        )
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (data_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))


class ExpertParallel:
    """The parallel side of one training run: which rank this is, and the collectives the trainer needs.

    ``group`` holds every rank of the run (the data split, metrics, checkpoints; None: the default group).
    ``ep_group`` is this rank's expert-parallel group (the experts are sharded over it; default: ``group``),
    ``dp_group`` the ranks holding the same expert shard (None: no replicas). :meth:`from_mesh` takes them from a
    ``("dp", "ep")`` device mesh."""

    def __init__(self, model: nn.Module, group=None, *, ep_group=None, dp_group=None, fsdp: bool = False) -> None:
        self.model = model
        self.group = group
        self.ep_group = group if ep_group is None else ep_group
        self.dp_group = dp_group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ep = dist.get_world_size(self.ep_group)
        self.dp = 1 if dp_group is None else dist.get_world_size(dp_group)
        if self.ep * self.dp != self.world:
            raise ValueError(f"ep ({self.ep}) x dp ({self.dp}) ranks must be the run's {self.world}")
        self.fsdp = bool(fsdp)
        self._expert_ids = {id(p) for p in expert_parameters(model)}
        # id() of the parameters FSDP holds as DTensor shards, once it is applied (:meth:`shard`).
        self._fsdp_ids: set[int] = set()

    @classmethod
    def from_mesh(cls, model: nn.Module, mesh, *, fsdp: bool = False) -> ExpertParallel:
        """The run's parallel side from a ``("dp", "ep")`` mesh (:func:`init_parallel_mesh`) over the default
        group; ``fsdp``: shard the non-expert weights over all ranks with FSDP2."""
        dp = mesh.get_group("dp") if mesh.size(0) > 1 else None
        return cls(model, None, ep_group=mesh.get_group("ep"), dp_group=dp, fsdp=fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- experts and FSDP -------------------------------------------------------------------------------------
    def shard(self, optimizer: torch.optim.Optimizer) -> None:
        """Slice the experts over the ``ep`` group and, with ``fsdp``, shard the other weights over all ranks (each a
        no-op once done). The optimizer's state moves with its parameters."""
        if self.ep > 1 and not is_expert_parallel(self.model):
            shard_experts_(self.model, optimizer, self.ep_group)
            if hasattr(optimizer, "sharded"):  # Adafactor: update clipping over the whole expert stack
                optimizer.sharded.update({i: self.ep_group for i in self._expert_ids})
        if self.fsdp and not self._fsdp_ids:
            self._apply_fsdp(optimizer)

    def unshard(self, optimizer: torch.optim.Optimizer) -> None:
        """Gather the experts back into full banks on every rank. FSDP's shards stay (FSDP2 cannot be undone):
        load full tensors into them with :meth:`distribute_full`."""
        if is_expert_parallel(self.model):
            unshard_experts_(self.model, optimizer, self.ep_group)
            if hasattr(optimizer, "sharded"):
                optimizer.sharded.clear()

    @property
    def fsdp_applied(self) -> bool:
        return bool(self._fsdp_ids)

    def _apply_fsdp(self, optimizer: torch.optim.Optimizer) -> None:
        """``fully_shard`` every unit of :func:`fsdp_units` (the blocks: one all-gather per block, freed after it
        runs) and then the model, with the expert banks ignored; swap the new DTensor parameters into
        ``optimizer`` with their state cut the same way."""
        if hasattr(optimizer, "sharded"):
            # Adafactor factors each weight matrix's second moment into row and column means: a shard of the
            # matrix cannot compute them alone.
            raise MoekitError("parallel.fsdp = true needs train.optimizer = 'adamw' (Adafactor factors whole weight "
                              "matrices, which FSDP splits over the ranks)")
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, distribute_tensor

        model = self.model
        device = next(iter(model.parameters())).device.type
        mesh = DeviceMesh.from_group(self.group if self.group is not None else dist.group.WORLD, device,
                                     mesh_dim_names=("fsdp",))
        # Not FSDP's: the expert banks (sliced over ep) and 0-dim parameters (Soft MoE's scale), which FSDP2 cannot
        # shard and which stay replicated, their gradients all-reduced as before.
        experts = set(expert_parameters(model))
        ignored = experts | {p for p in model.parameters() if p.dim() == 0}
        before = dict(model.named_parameters())
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        for module in model.modules():
            if hasattr(module, "set_gradient_divide_factor"):
                # SUM, not FSDP's mean: each rank already back-propagates loss / world. Forcing plain SUM collectives
                # also keeps gloo working (it has no pre-multiplied sum).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        after = dict(model.named_parameters())
        swapped = {id(before[n]): after[n] for n in before if after[n] is not before[n]}
        for group in optimizer.param_groups:
            group["params"] = [swapped.get(id(p), p) for p in group["params"]]
        for name, old in before.items():
            new = after[name]
            if new is old or old not in optimizer.state:
                continue
            state = optimizer.state.pop(old)
            optimizer.state[new] = {
                k: distribute_tensor(v, new.device_mesh, new.placements, src_data_rank=None)
                if isinstance(v, Tensor) and v.shape == old.shape and v.dim() > 0 else v
                for k, v in state.items()
            }
        self._fsdp_ids = {id(p) for p in after.values() if isinstance(p, DTensor)}

    def distribute_full(self, tensors: dict[str, Tensor], model_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Full (single-process) tensors cut into this rank's FSDP shards wherever ``model_state`` (name -> the
        tensor it will be loaded into) holds a DTensor; the others unchanged. No communication: every rank holds
        the full tensor."""
        if not self._fsdp_ids:
            return tensors
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = dict(tensors)
        for name, target in model_state.items():
            if isinstance(target, DTensor) and name in out and not isinstance(out[name], DTensor):
                out[name] = distribute_tensor(out[name], target.device_mesh, target.placements, src_data_rank=None)
        return out

    def distribute_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """An optimizer ``state_dict`` of full tensors with each FSDP parameter's per-element state (its shape)
        cut into this rank's shard, as :meth:`distribute_full` does for weights."""
        if not self._fsdp_ids:
            return state
        from torch.distributed.tensor import distribute_tensor

        order = [p for group in optimizer.param_groups for p in group["params"]]
        out: dict[int, dict[str, Any]] = {}
        for i, values in state["state"].items():
            p = order[int(i)]
            if id(p) not in self._fsdp_ids:
                out[i] = values
                continue
            out[i] = {
                k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape == p.shape else v
                for k, v in values.items()
            }
        return {**state, "state": out}

    # -- data ------------------------------------------------------------------------------------------------
    def local_rows(self, batch_BT: Tensor) -> Tensor:
        """This rank's share of a global batch: consecutive rows, as equal as the batch size allows."""
        return torch.tensor_split(batch_BT, self.world)[self.rank]

    # -- gradients -------------------------------------------------------------------------------------------
    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """SUM-all-reduce the replicated parameters' gradients over all ranks and the experts' over the ``dp``
        replicas (each rank back-propagated loss / world).

        A missing gradient becomes zeros first: experts that received no rows on this rank have none, while the
        single-process bank (one grouped matmul over all experts) gets zeros, which the optimizer does apply
        (moments, weight decay); and every rank must all-reduce buffers of the same size.
        """
        for p in params:
            if p.grad is None and id(p) not in self._fsdp_ids:
                p.grad = torch.zeros_like(p)
        # FSDP's shards arrive reduced (its reduce-scatter ran in backward).
        _sum_into([p.grad for p in params if id(p) not in self._expert_ids and id(p) not in self._fsdp_ids],
                  self.group)
        if self.dp_group is not None:
            _sum_into([p.grad for p in params if id(p) in self._expert_ids], self.dp_group)

    def clip_gradients(self, params: list[nn.Parameter], bound: float) -> float:
        """Global gradient norm over every parameter of the whole model (replicated ones counted once), clipped
        to ``bound`` as ``torch.nn.utils.clip_grad_norm_`` does. Returns the norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        replicated, experts, shards = [], [], []
        for p in params:
            if p.grad is not None:
                kind = experts if id(p) in self._expert_ids else shards if id(p) in self._fsdp_ids else replicated
                kind.append(p.grad.to_local() if kind is shards else p.grad)
        sq = torch.zeros(3, dtype=torch.float64)
        for i, part in enumerate((replicated, experts, shards)):
            if part:
                sq[i] = sum(float(g.detach().double().pow(2).sum()) for g in part)
        dist.all_reduce(sq[1:2], group=self.ep_group)  # the dp replicas hold the same expert gradients
        if self._fsdp_ids:
            dist.all_reduce(sq[2:], group=self.group)  # every rank holds its own shard of each
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


def _sum_into(grads: list[Tensor], group) -> None:
    """SUM-all-reduce ``grads`` in place over ``group``, as one collective."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
