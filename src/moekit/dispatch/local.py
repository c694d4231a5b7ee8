"""Gather plans: token-choice and expert-choice assignments as rows in expert order, capacity applied, and back.

This is how every fast dropless system moves tokens (MegaBlocks, ScatterMoE, torchtitan): a stable sort of the
assignments by expert, one gather of the token rows into expert order, and a gate-weighted sum back. Its cost is
O(S * k * d), independent of E, unlike the one-hot ``[S, E, C]`` einsum of GShard / Switch (docs/ALGORITHMS.md
section 17.1).

Every data movement here is a *gather*, forward and backward: the plan keeps both directions of the mapping
(``token_idx_A``: row -> token, ``pos_SK``: (token, choice) -> row), so the backward of a gather is another gather
rather than autograd's default ``index_add`` scatter (no atomic adds and no zero-filled buffer on GPU, as ScatterMoE
does; on CPU the margin depends on k and the machine: docs/ALGORITHMS.md sections 8 and 17.2).

Capacity and drop rules are docs/ALGORITHMS.md section 1: ``C = max(min_capacity, ceil(CF * k * S / E))`` capped
at S (per routing group); every first choice claims a slot before any second choice; within a choice rank tokens go in
group order (or the router's batch-priority order); positions >= C are dropped and contribute zero; kept gates are
not renormalised.

Shape legend: S tokens of the call (G groups of T tokens each), D model width, E experts, K choices per token,
A kept assignments (sorted by expert), N = S * K assignments in all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.routing.decision import ExpertChoiceDecision, TokenChoiceDecision
from moekit.routing.topk import token_choice_capacity

__all__ = [
    "DispatchPlan",
    "combine",
    "permute",
    "plan_decision",
    "plan_expert_choice",
    "plan_token_choice",
    "token_choice_capacity",
]


@dataclass(frozen=True)
class RowsByToken:
    """The rows of a plan grouped by token, as the index arrays of a sparse ``[S, A]`` matrix in CSR form: token
    ``s`` owns rows ``rows_A[crow_S1[s]:crow_S1[s + 1]]`` (in expert order).

    Summing each token's rows is then one sparse-dense matmul in which every output row reads only its own rows:
    a gather, with no padding to the largest number of rows a token has (expert choice gives a token anywhere from
    0 to E rows) and no scatter.
    """

    crow_S1: Tensor
    rows_A: Tensor

    def sum_rows(self, weights_A: Tensor, y_AD: Tensor) -> Tensor:
        """``out[s] = sum over the rows a of token s of weights[a] * y[a]``: ``[S, D]``, in y's dtype.

        Computed in float32 (float64 for float64 input): sparse matmuls have no bfloat16 kernel on every device, and
        the accumulation is more accurate for it.
        """
        dtype = y_AD.dtype if y_AD.dtype in (torch.float32, torch.float64) else torch.float32
        S, A = self.crow_S1.numel() - 1, self.rows_A.numel()
        with warnings.catch_warnings():
            # torch flags every sparse CSR construction as a beta feature; the matmul used here is a stable kernel.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            # The indices are built by the plan, valid by construction: no O(nnz) invariant check per call.
            w_SA = torch.sparse_csr_tensor(
                self.crow_S1, self.rows_A, weights_A[self.rows_A].to(dtype), size=(S, A), check_invariants=False
            )
        with torch.autocast(device_type=y_AD.device.type, enabled=False):
            return (w_SA @ y_AD.to(dtype)).to(y_AD.dtype)


class _SumRowsByToken(torch.autograd.Function):
    """``out[s] = sum_a w[a] * y[a]`` over token s's rows; backward: ``grad_y[a] = w[a] * grad[token(a)]`` and
    ``grad_w[a] = <grad[token(a)], y[a]>``, both gathers."""

    @staticmethod
    def forward(ctx, y_AD: Tensor, w_A: Tensor, token_idx_A: Tensor, by_token: RowsByToken) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y_AD, w_A, token_idx_A)
        return by_token.sum_rows(w_A, y_AD)

    @staticmethod
    def backward(ctx, grad_SD: Tensor):  # type: ignore[override]
        y_AD, w_A, token_idx_A = ctx.saved_tensors
        g_AD = grad_SD.index_select(0, token_idx_A)
        grad_y = g_AD * w_A.to(g_AD.dtype).unsqueeze(-1) if ctx.needs_input_grad[0] else None
        grad_w = (g_AD.float() * y_AD.float()).sum(dim=-1).to(w_A.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None


class _GatherTokensByToken(torch.autograd.Function):
    """``x_AD = x_SD[token_idx_A]``; backward sums each token's gradient rows through :class:`RowsByToken`."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, token_idx_A: Tensor, by_token: RowsByToken) -> Tensor:  # type: ignore[override]
        ctx.by_token = by_token
        return x_SD.index_select(0, token_idx_A)

    @staticmethod
    def backward(ctx, grad_AD: Tensor):  # type: ignore[override]
        ones_A = torch.ones(grad_AD.shape[0], dtype=torch.float32, device=grad_AD.device)
        return ctx.by_token.sum_rows(ones_A, grad_AD), None, None


@dataclass(repr=False)
class DispatchPlan:
    """Where each kept (token, expert) assignment goes, in expert order: the plan of token choice and expert choice.

    Token choice fills it from each token's K choices; expert choice from each expert's picks, with K the largest
    number of experts any token got (a token's picks are its "choices", in expert order).

    Attributes:
        token_idx_A: int64 token index (in [0, S)) of each kept assignment, sorted by expert (then group).
        assign_idx_A: int64 flat index ``s * K + k`` of each kept assignment, to gather its gate.
        tokens_per_expert_E: int64 number of kept assignments per expert (sums to A).
        num_assignments: token choice: assignments the router made (valid ones), before capacity. Expert choice:
            the number of tokens S.
        num_dropped: token choice: assignments dropped for lack of capacity. Expert choice: tokens no expert took.
        capacity: C per expert per group, or None for dropless.
        pos_SK: int64 row (in [0, A)) of each token's k-th choice, or -1 where it was dropped or declined.
        gates_SK: combine weight of each (token, choice) (only kept entries are read); None for a bare plan.
        rows_per_expert: the same row count for every expert (expert choice), or None; lets the bank run one
            batched matmul.
        gates_A: expert choice: the combine weight of each row.
        by_token: expert choice: the rows grouped by token (:class:`RowsByToken`), so that summing a token's rows
            reads exactly its own rows, however many experts took it.
    """

    token_idx_A: Tensor
    assign_idx_A: Tensor
    tokens_per_expert_E: Tensor
    num_assignments: int
    num_dropped: int
    capacity: int | None
    pos_SK: Tensor
    gates_SK: Tensor | None = None
    rows_per_expert: int | None = None
    gates_A: Tensor | None = None
    by_token: RowsByToken | None = None

    def dispatch(self, x_SD: Tensor) -> Tensor:
        """The token rows of the kept assignments in expert order: ``[A, D]``."""
        return permute(x_SD, self)

    def combine(self, y_AD: Tensor) -> Tensor:
        """Gate-weighted sum of each token's expert outputs: ``[S, D]``."""
        if self.by_token is not None and self.gates_A is not None:
            return _SumRowsByToken.apply(y_AD, self.gates_A, self.token_idx_A, self.by_token)
        if self.gates_SK is None:
            raise ValueError("this plan has no gates: build it with plan_decision / plan_expert_choice")
        return combine(y_AD, self, self.gates_SK)

    def __repr__(self) -> str:
        S, K = self.pos_SK.shape
        return (
            f"DispatchPlan(tokens={S}, choices={K}, rows={self.token_idx_A.numel()}, experts="
            f"{self.tokens_per_expert_E.numel()}, capacity={self.capacity}, dropped={self.num_dropped} of "
            f"{self.num_assignments})"
        )

    @property
    def all_kept(self) -> bool:
        """Every (token, choice) has a row: no capacity drops and no declined choices."""
        return self.token_idx_A.numel() == self.pos_SK.numel()

    def kept_mask_SK(self) -> Tensor:
        return self.pos_SK >= 0

    @property
    def drop_fraction(self) -> float:
        return self.num_dropped / self.num_assignments if self.num_assignments else 0.0


def plan_token_choice(
    expert_ids_SK: Tensor,
    num_experts: int,
    capacity: int | None,
    *,
    num_groups: int = 1,
    valid_SK: Tensor | None = None,
    priority_S: Tensor | None = None,
) -> DispatchPlan:
    """Sort the S * K assignments into expert order and apply the per-group capacity.

    One stable sort does all the bookkeeping: the assignments are first laid out rank-major (all first choices,
    then all second choices, ...) and, within a rank, in priority order (group order unless ``priority_S`` is
    given); a stable sort by the bucket key ``expert * G + group`` then keeps that order inside each bucket, so a
    bucket's first C entries are exactly the assignments that win its slots.
    """
    S, K = expert_ids_SK.shape
    if num_groups < 1 or S % num_groups != 0:
        raise ValueError(f"{S} tokens cannot be split into {num_groups} equal routing groups")
    device = expert_ids_SK.device
    T = S // num_groups
    num_buckets = num_experts * num_groups

    order_S = priority_S if priority_S is not None else torch.arange(S, device=device)
    token_N = order_S.repeat(K)  # rank-major: [k=0: order..., k=1: order..., ...]
    rank_N = torch.arange(K, device=device).repeat_interleave(S)
    expert_N = expert_ids_SK[token_N, rank_N]
    key_N = expert_N * num_groups + torch.div(token_N, T, rounding_mode="floor")
    num_assignments = S * K
    if valid_SK is not None:
        valid_N = valid_SK[token_N, rank_N]
        key_N = torch.where(valid_N, key_N, torch.full_like(key_N, num_buckets))  # sentinel bucket sorts last
        num_assignments = int(valid_N.sum())

    sorted_key_N, perm_N = torch.sort(key_N, stable=True)
    # Scatter-add counts instead of bincount, which reads max(key) back to the host first (a sync on GPU).
    counts_B = torch.zeros(num_buckets + 1, dtype=torch.int64, device=device)
    counts_B = counts_B.index_add_(0, key_N, torch.ones_like(key_N))[:num_buckets]
    if capacity is None:
        # Without declined choices every assignment is kept: no need to ask the device how many (a host sync).
        n_kept = S * K if valid_SK is None else num_assignments
        kept_N = perm_N[:n_kept]
        kept_counts_B = counts_B
    else:
        starts_B = torch.cumsum(counts_B, 0) - counts_B
        in_bucket_N = sorted_key_N < num_buckets
        pos_N = torch.arange(sorted_key_N.numel(), device=device) - starts_B[sorted_key_N.clamp(max=num_buckets - 1)]
        keep_N = in_bucket_N & (pos_N < capacity)
        kept_N = perm_N[keep_N]
        kept_counts_B = counts_B.clamp(max=capacity)

    token_idx_A = token_N[kept_N]
    assign_idx_A = token_idx_A * K + rank_N[kept_N]
    tokens_per_expert_E = kept_counts_B.view(num_experts, num_groups).sum(dim=1)
    num_kept = int(token_idx_A.numel())
    pos_SK = torch.full((S * K,), -1, dtype=torch.int64, device=device)
    pos_SK[assign_idx_A] = torch.arange(num_kept, device=device)
    return DispatchPlan(
        token_idx_A=token_idx_A,
        assign_idx_A=assign_idx_A,
        tokens_per_expert_E=tokens_per_expert_E,
        num_assignments=num_assignments,
        num_dropped=num_assignments - num_kept,
        capacity=capacity,
        pos_SK=pos_SK.view(S, K),
    )


def plan_decision(
    decision: TokenChoiceDecision,
    num_experts: int,
    capacity: int | None = None,
    num_groups: int | None = None,
) -> DispatchPlan:
    """:func:`plan_token_choice` for a router's decision (its declined choices, priority order and gates included).

    ``capacity`` and ``num_groups`` default to the decision's own; pass them to plan the same choices otherwise.
    """
    plan = plan_token_choice(
        decision.expert_ids_SK,
        num_experts,
        decision.capacity if capacity is None else capacity,
        num_groups=decision.num_groups if num_groups is None else num_groups,
        valid_SK=decision.valid_SK,
        priority_S=decision.priority_S,
    )
    plan.gates_SK = decision.gates_SK
    return plan


def plan_expert_choice(decision: ExpertChoiceDecision) -> DispatchPlan:
    """Lay the experts' picks out as rows in expert order (expert, then group, then pick rank) and index, for each
    token, the rows that took it, so both directions are gathers.

    A token may be taken by 0..E experts. Its rows, in expert order, are summed through :class:`RowsByToken` (no
    padding to the most rows any token got); ``pos_SK`` lists them too, with K the most any token got, for
    analysis.
    """
    G, E, C = decision.token_ids_GEC.shape
    S = decision.probs_SE.shape[0]
    T = S // G
    device = decision.token_ids_GEC.device
    offsets_G11 = (torch.arange(G, device=device) * T).view(G, 1, 1)
    token_idx_A = (decision.token_ids_GEC + offsets_G11).permute(1, 0, 2).reshape(-1)
    gates_A = decision.gates_GEC.permute(1, 0, 2).reshape(-1)
    A = token_idx_A.numel()
    counts_S = torch.zeros(S, dtype=torch.int64, device=device).index_add_(0, token_idx_A, torch.ones_like(token_idx_A))
    # A stable sort by token keeps each token's rows in expert order; a row's rank in its token's run is its slot.
    sorted_tok_A, order_A = torch.sort(token_idx_A, stable=True)
    starts_S = torch.cumsum(counts_S, 0) - counts_S
    slot_A = torch.empty_like(token_idx_A)
    slot_A[order_A] = torch.arange(A, device=device) - starts_S[sorted_tok_A]
    # One host read for both: the most experts any token got (K) and the tokens no expert took.
    K, num_unpicked = torch.stack([counts_S.max(), (counts_S == 0).sum()]).tolist()
    assign_idx_A = token_idx_A * K + slot_A
    pos_SK = torch.full((S * K,), -1, dtype=torch.int64, device=device)
    pos_SK[assign_idx_A] = torch.arange(A, device=device)
    crow_S1 = torch.zeros(S + 1, dtype=torch.int64, device=device)
    crow_S1[1:] = torch.cumsum(counts_S, 0)
    return DispatchPlan(
        token_idx_A=token_idx_A,
        assign_idx_A=assign_idx_A,
        tokens_per_expert_E=torch.full((E,), G * C, dtype=torch.int64, device=device),
        num_assignments=S,
        num_dropped=num_unpicked,
        capacity=C,
        pos_SK=pos_SK.view(S, K),
        rows_per_expert=G * C,
        gates_A=gates_A,
        by_token=RowsByToken(crow_S1, order_A),
    )


def _sum_rows_by_token(rows_AD: Tensor, pos_SK: Tensor, all_kept: bool) -> Tensor:
    """``out[s] = sum_k rows[pos[s, k]]`` over kept choices, by gathers only: ``[S, D]``."""
    S, K = pos_SK.shape
    if rows_AD.shape[0] == 0:
        return rows_AD.new_zeros(S, rows_AD.shape[-1])
    if all_kept and K == 1:
        return rows_AD.index_select(0, pos_SK.view(-1))
    g_SKD = rows_AD.index_select(0, pos_SK.clamp(min=0).view(-1)).view(S, K, -1)
    if all_kept:
        return g_SKD.sum(dim=1)
    mask_S1K = (pos_SK >= 0).to(rows_AD.dtype).unsqueeze(1)
    return torch.bmm(mask_S1K, g_SKD).squeeze(1)  # masked sum over k in one pass


class _GatherTokens(torch.autograd.Function):
    """``x_AD = x_SD[token_idx_A]``; backward gathers the gradient back per token instead of scattering it.

    The context keeps index tensors only (never the plan, which holds gates that are part of the graph)."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, token_idx_A: Tensor, pos_SK: Tensor) -> Tensor:  # type: ignore[override]
        ctx.pos_SK = pos_SK
        ctx.all_kept = token_idx_A.numel() == pos_SK.numel()
        return x_SD.index_select(0, token_idx_A)

    @staticmethod
    def backward(ctx, grad_AD: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _sum_rows_by_token(grad_AD.contiguous(), ctx.pos_SK, ctx.all_kept), None, None


class _GatherChoices(torch.autograd.Function):
    """``y_SKD = y_AD[pos_SK]`` (rows of dropped choices are arbitrary and must get gate 0); backward gathers the
    gradient of each row from its one (token, choice) slot."""

    @staticmethod
    def forward(ctx, y_AD: Tensor, pos_SK: Tensor, assign_idx_A: Tensor) -> Tensor:  # type: ignore[override]
        ctx.assign_idx_A = assign_idx_A
        S, K = pos_SK.shape
        if y_AD.shape[0] == 0:
            return y_AD.new_zeros(S, K, y_AD.shape[-1])
        return y_AD.index_select(0, pos_SK.clamp(min=0).view(-1)).view(S, K, -1)

    @staticmethod
    def backward(ctx, grad_SKD: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        D = grad_SKD.shape[-1]
        return grad_SKD.reshape(-1, D).index_select(0, ctx.assign_idx_A), None, None


def permute(x_SD: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather the token rows of the kept assignments into expert order: ``[A, D]``."""
    if not torch.is_grad_enabled() or not x_SD.requires_grad:
        return x_SD.index_select(0, plan.token_idx_A)
    if plan.by_token is not None:
        return _GatherTokensByToken.apply(x_SD, plan.token_idx_A, plan.by_token)
    return _GatherTokens.apply(x_SD, plan.token_idx_A, plan.pos_SK)


def combine(y_AD: Tensor, plan: DispatchPlan, gates_SK: Tensor, num_tokens: int | None = None) -> Tensor:
    """Weight each expert output by its gate and sum the k outputs of every token: ``[S, D]``.

    Dropped assignments contribute zero (their gate is masked to 0) and the kept gates are used as they are (not
    renormalised). S comes from the plan; ``num_tokens``, if given, is checked against it.
    """
    if num_tokens is not None and num_tokens != plan.pos_SK.shape[0]:
        raise ValueError(f"num_tokens={num_tokens} does not match the plan's {plan.pos_SK.shape[0]} tokens")
    y_SKD = _GatherChoices.apply(y_AD, plan.pos_SK, plan.assign_idx_A)
    gates_SK = gates_SK.to(y_AD.dtype)
    if not plan.all_kept:
        gates_SK = gates_SK * plan.kept_mask_SK().to(y_AD.dtype)
    if gates_SK.shape[1] == 1:
        return y_SKD.squeeze(1) * gates_SK
    return torch.bmm(gates_SK.unsqueeze(1), y_SKD).squeeze(1)
