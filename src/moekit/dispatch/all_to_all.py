"""Expert-parallel dispatch over a torch.distributed process group: each rank holds ``E / ep`` experts.

Same two methods as :class:`~moekit.dispatch.plan.LocalDispatcher`, so a layer does not change, and it wraps any
plan (token choice, expert choice, Soft MoE). Each rank plans its own tokens exactly as one process would (its
routing groups are its own tokens', so capacity, drops, expert-choice picks and Soft MoE slots are per rank), then:

1. the plan's rows, in global expert order, are contiguous per owning rank (rank r owns experts
   ``[r * E_local, (r + 1) * E_local)``), so one variable-size ``all_to_all_single`` sends each block to its owner;
2. the rows arrive grouped by source rank, then local expert; a permutation regroups them by local expert (then
   source rank) so the bank's grouped matmul runs each local expert once;
3. :meth:`combine` undoes 2 and 1 and lets the local plan combine the rows (gates, Soft MoE combine weights).

The exchange is an autograd Function whose backward is the reverse exchange, so gradients reach the experts'
owners and come back to the tokens' owners. Collectives run in the same order on every rank (every layer, forward
and backward), which holds as long as every rank runs the same model on the same number of tokens.

Shape legend: S tokens of this rank's call, D model width, E experts in all, L = E / ep experts on this rank,
R ranks, A kept assignments of this rank's tokens, B rows this rank's experts receive from all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.dispatch.plan import ExpertRows, Plan

__all__ = ["AllToAllDispatcher", "all_to_all_rows", "local_expert_range"]


def local_expert_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(first, stop)`` of the experts ``rank`` owns; E must divide evenly so every rank runs the same shapes."""
    if world_size < 1 or num_experts % world_size != 0:
        raise ValueError(
            f"expert parallelism needs the number of experts ({num_experts}) to be divisible by the number of "
            f"expert-parallel ranks ({world_size})"
        )
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of rows; backward sends the gradient rows back the way they came."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x_ND, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):  # type: ignore[override]
        return _exchange(grad_MD, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(x_ND: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(out_MD, x_ND.contiguous(), out_splits, in_splits, group=group)
    return out_MD


def all_to_all_rows(x_ND: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Send ``in_splits[r]`` consecutive rows to rank r and receive ``out_splits[r]`` from it (autograd-aware)."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


class _Permute(torch.autograd.Function):
    """``x[idx]`` for a permutation ``idx``; backward gathers with the inverse permutation (no scatter)."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, idx_B: Tensor, inv_B: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv_B)
        return x_BD.index_select(0, idx_B)

    @staticmethod
    def backward(ctx, grad_BD: Tensor):  # type: ignore[override]
        (inv_B,) = ctx.saved_tensors
        return grad_BD.index_select(0, inv_B), None, None


@dataclass
class _ExpertParallelState:
    plan: Plan  # this rank's plan over all E experts (what the layer reports as drops and loads)
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    to_expert_major_B: Tensor  # received order (rank, expert) -> (expert, rank)
    to_rank_major_B: Tensor  # its inverse
    x_BD: Tensor  # the rows this rank's experts received (for the autograd tie in combine)


class AllToAllDispatcher:
    """Expert-parallel dispatcher: routes this rank's tokens, runs them on the experts' owners, brings them back.

    Args:
        num_experts: E, the experts of the whole layer (the router's width).
        group: the expert-parallel process group (None: the default group).
    """

    def __init__(self, num_experts: int, group=None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher needs an initialised torch.distributed process group")
        self.num_experts = num_experts
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        first, stop = local_expert_range(num_experts, self.world_size, self.rank)
        self.num_local_experts = stop - first
        self.first_expert = first

    def dispatch(self, x_SD: Tensor, plan: Plan) -> ExpertRows:
        """The rows for this rank's experts, by local expert, with their counts ``[L]``."""
        R, L = self.world_size, self.num_local_experts
        x_AD = plan.dispatch(x_SD)
        # How many rows each rank sends for each of our experts: one small exchange of the counts.
        send_counts_RL = plan.tokens_per_expert_E.view(R, L)
        recv_counts_RL = torch.empty_like(send_counts_RL)
        dist.all_to_all_single(recv_counts_RL, send_counts_RL.contiguous(), group=self.group)
        send_splits = send_counts_RL.sum(dim=1).tolist()
        recv_splits = recv_counts_RL.sum(dim=1).tolist()
        x_BD = all_to_all_rows(x_AD, recv_splits, send_splits, self.group)

        # Received rows are blocks (rank r, expert l) in rank-major order; list them expert-major instead.
        counts_N = recv_counts_RL.reshape(-1)
        starts_RL = (torch.cumsum(counts_N, 0) - counts_N).view(R, L)
        counts_LR = recv_counts_RL.t().reshape(-1)
        starts_LR = starts_RL.t().reshape(-1)
        out_starts_LR = torch.cumsum(counts_LR, 0) - counts_LR
        B = int(counts_N.sum())
        to_expert_major_B = torch.repeat_interleave(starts_LR - out_starts_LR, counts_LR, output_size=B) + torch.arange(
            B, device=x_SD.device
        )
        to_rank_major_B = torch.empty_like(to_expert_major_B)
        to_rank_major_B[to_expert_major_B] = torch.arange(B, device=x_SD.device)
        x_BD = _Permute.apply(x_BD, to_expert_major_B, to_rank_major_B)
        tokens_per_local_expert_L = recv_counts_RL.sum(dim=0)
        per_expert_L = tokens_per_local_expert_L.tolist()
        uniform = per_expert_L[0] if plan.rows_per_expert is not None and len(set(per_expert_L)) == 1 else None
        state = _ExpertParallelState(plan, send_splits, recv_splits, to_expert_major_B, to_rank_major_B, x_BD)
        return ExpertRows(x_BD, tokens_per_local_expert_L, uniform, state)

    def combine(self, y_BD: Tensor, rows: ExpertRows) -> Tensor:
        """Send the expert outputs back to the tokens' ranks and combine them there with the local plan: ``[S, D]``."""
        state: _ExpertParallelState = rows.state
        # Every rank must run every reverse exchange in the backward, but autograd skips a node whose output gets
        # no gradient, which happens when a rank received no rows or kept none of its own (an empty tensor's path
        # through the bank or the gate-weighted sum may be cut). A zero-valued tie keeps both exchanges on the
        # path from the output.
        if y_BD.shape[0] == 0 and state.x_BD.requires_grad:
            y_BD = y_BD + 0.0 * state.x_BD.sum()
        y_BD = _Permute.apply(y_BD, state.to_rank_major_B, state.to_expert_major_B)
        y_AD = all_to_all_rows(y_BD, state.send_splits, state.recv_splits, self.group)
        y_SD = state.plan.combine(y_AD)
        if y_AD.shape[0] == 0 and y_AD.requires_grad:
            y_SD = y_SD + 0.0 * y_AD.sum()
        return y_SD
