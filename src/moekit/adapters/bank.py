"""Adapters on one projection of an expert bank: per-expert LoRA, (IA)3, MoLoRA and MoV (docs/ALGORITHMS.md 5.10).

An expert bank runs E experts at once on rows laid out by expert: either A rows sorted by expert with a count per
expert (token choice: the grouped matmul), or a fixed N rows per expert ``[E, N, width]`` (expert choice and Soft
MoE: a batched matmul). :class:`BankRows` is that layout; every adapter here takes it with its input and computes
with ``rows.matmul`` on the same rows as the frozen bank, so a bank adapter costs a few grouped matmuls of width r
(or M adapter experts), never a Python loop over the experts.

Per bank expert e (the index of the row's expert):
- LoRA: ``delta = (alpha / r) * dropout(x) @ A[e] @ B[e]``, ``A`` [E, I, r], ``B`` [E, r, O] = 0 at init;
- (IA)3: ``a' = a * l[e]``, ``l`` [E, H] = 1 at init;
- MoLoRA: M LoRA pairs per bank expert mixed by a float32 router of that bank expert on x:
  ``s = softmax(x @ W_r[e])``, ``delta = (alpha / r) * sum_m s_m * dropout(x) @ A[e, m] @ B[e, m]``;
- MoV: M vectors per bank expert mixed by a router of that bank expert on a: ``a' = a * (1 + s @ (L[e] - 1))``.

Shape legend: A rows sorted by expert, E bank experts, N rows per expert (slots), I projection input width,
O projection output width, H rescaled activation width, r LoRA rank, M adapter experts per bank expert,
``x`` either ``A`` or ``E, N``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.adapters.lora import _init_a
from moekit.adapters.recording import RouterRecorder
from moekit.adapters.router import mix_gates
from moekit.ops.grouped_mm import grouped_mm

__all__ = ["BankIA3", "BankLoRA", "BankMoLoRA", "BankMoV", "BankRouter", "BankRows"]


class BankRows:
    """The layout of a bank call's rows: grouped (``counts_E`` given, rows ``[A, width]`` sorted by expert) or
    slots (``counts_E`` None, rows ``[E, N, width]``).

    Args:
        counts_E: int rows per expert (grouped layout), or None (slots layout).
        backend: the grouped-matmul backend of the bank (``moekit.ops.BACKENDS``); the adapters use the bank's.
    """

    def __init__(self, counts_E: Tensor | None = None, backend: str = "auto") -> None:
        self.counts_E = counts_E
        self.backend = backend
        self.offsets_E = None if counts_E is None else torch.cumsum(counts_E, 0, dtype=torch.int32)
        self._expert_A: Tensor | None = None

    def matmul(self, x_xI: Tensor, w_EIO: Tensor) -> Tensor:
        """``y[rows of e] = x[rows of e] @ w[e]``: the grouped matmul, or ``bmm`` for slots."""
        if self.counts_E is None:
            return torch.bmm(x_xI, w_EIO)
        return grouped_mm(x_xI, w_EIO, self.counts_E, self.offsets_E, backend=self.backend)

    def per_expert(self, v_EH: Tensor, x_xH: Tensor) -> Tensor:
        """``v[expert of each row]``, shaped to broadcast against the rows ``x_xH``: a gather (grouped) or a view
        (slots)."""
        if self.counts_E is None:
            return v_EH[:, None, :]
        if self._expert_A is None:
            E = self.counts_E.shape[0]
            # output_size avoids a host sync: the rows are the counts' sum by construction.
            self._expert_A = torch.repeat_interleave(torch.arange(E, device=x_xH.device), self.counts_E,
                                                     output_size=x_xH.shape[0])
        return v_EH.index_select(0, self._expert_A)


class BankRouter(nn.Module):
    """One float32 router per bank expert: ``s = softmax(x @ W_r[e])`` over M adapter experts (soft or top-k).

    ``weight_EIM`` [E, I, M] is initialised N(0, 0.02^2) with no bias, like :class:`AdapterRouter`. Rows of a bank
    are tokens of many sequences, so there is no sentence-level routing here; ``sequence_mask`` is accepted (for
    :func:`moekit.adapters.set_sequence_mask`) and ignored, and a recorder counts every routed row.
    """

    def __init__(self, num_bank_experts: int, d_in: int, num_experts: int, routing: str = "soft",
                 top_k: int = 2) -> None:
        super().__init__()
        self.weight_EIM = nn.Parameter(torch.empty(num_bank_experts, d_in, num_experts, dtype=torch.float32))
        nn.init.normal_(self.weight_EIM, mean=0.0, std=0.02)
        self.routing = routing
        self.top_k = top_k
        # Plain attributes, not buffers: per-forward context, never saved.
        self.sequence_mask: Tensor | None = None
        self.recorder: RouterRecorder | None = None
        self.site_name = ""

    def forward(self, x_xI: Tensor, rows: BankRows) -> Tensor:
        # float32 routing whatever the bank's dtype (docs/ALGORITHMS.md 5.7).
        probs_xM = torch.softmax(rows.matmul(x_xI.float(), self.weight_EIM), dim=-1)
        if self.recorder is not None:
            self.recorder.add(self.site_name, probs_xM.detach())
        return mix_gates(probs_xM, self.routing, self.top_k)


class BankLoRA(nn.Module):
    """Per-expert LoRA on one bank projection ``[E, I, O]``: ``x -> (alpha / r) * dropout(x) @ A[e] @ B[e]``."""

    def __init__(self, num_bank_experts: int, d_in: int, d_out: int, r: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        a_ErI = torch.empty(num_bank_experts, r, d_in, dtype=torch.float32)
        _init_a(a_ErI)  # the linear LoRA's A init per expert (fan-in I), stored transposed for x @ A
        self.a_EIr = nn.Parameter(a_ErI.transpose(1, 2).contiguous())
        self.b_ErO = nn.Parameter(torch.zeros(num_bank_experts, r, d_out, dtype=torch.float32))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_xI: Tensor, rows: BankRows) -> Tensor:
        h_xr = rows.matmul(self.dropout(x_xI), self.a_EIr.to(x_xI.dtype))
        return rows.matmul(h_xr, self.b_ErO.to(x_xI.dtype)) * self.scaling

    def merged_delta(self) -> Tensor:
        """``(alpha / r) * A[e] @ B[e]`` of shape ``[E, I, O]``, folded into the bank by ``merge_adapters``."""
        return torch.bmm(self.a_EIr, self.b_ErO).detach() * self.scaling


class BankMoLoRA(nn.Module):
    """M LoRA pairs per bank expert, mixed by that expert's router on the projection input; zero at init.

    The M pairs of a bank expert are one ``[I, M * r]`` and one ``[M * r, O]`` matrix, so the whole mixture is two
    grouped matmuls with the gates applied to the ``[rows, M, r]`` middle.
    """

    def __init__(self, num_bank_experts: int, d_in: int, d_out: int, num_experts: int, r: int, alpha: float,
                 routing: str = "soft", top_k: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        E, M = num_bank_experts, num_experts
        a_EMrI = torch.empty(E, M, r, d_in, dtype=torch.float32)
        _init_a(a_EMrI)
        self.a_EIMr = nn.Parameter(a_EMrI.permute(0, 3, 1, 2).contiguous())
        self.b_EMrO = nn.Parameter(torch.zeros(E, M, r, d_out, dtype=torch.float32))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.router = BankRouter(E, d_in, M, routing, top_k)

    def forward(self, x_xI: Tensor, rows: BankRows) -> Tensor:
        E, I, M, r = self.a_EIMr.shape
        gates_xM = self.router(x_xI, rows).to(x_xI.dtype)
        h_xQ = rows.matmul(self.dropout(x_xI), self.a_EIMr.to(x_xI.dtype).reshape(E, I, M * r))  # Q = M * r
        h_xQ = (h_xQ.unflatten(-1, (M, r)) * gates_xM.unsqueeze(-1)).flatten(-2)
        return rows.matmul(h_xQ, self.b_EMrO.to(x_xI.dtype).reshape(E, M * r, -1)) * self.scaling


class BankIA3(nn.Module):
    """Per-expert (IA)3: ``a -> a * l[e]`` with ``l`` [E, H] initialised to 1."""

    def __init__(self, num_bank_experts: int, width: int) -> None:
        super().__init__()
        self.vector_EH = nn.Parameter(torch.ones(num_bank_experts, width, dtype=torch.float32))

    def forward(self, a_xH: Tensor, rows: BankRows) -> Tensor:
        return a_xH * rows.per_expert(self.vector_EH.to(a_xH.dtype), a_xH)

    def merged_vector(self) -> Tensor:
        return self.vector_EH.detach()


class BankMoV(nn.Module):
    """M (IA)3 vectors per bank expert mixed by that expert's router on ``a``: ``a * (1 + s @ (L[e] - 1))``."""

    def __init__(self, num_bank_experts: int, width: int, num_experts: int, routing: str = "soft",
                 top_k: int = 2) -> None:
        super().__init__()
        self.experts_EMH = nn.Parameter(torch.ones(num_bank_experts, num_experts, width, dtype=torch.float32))
        self.router = BankRouter(num_bank_experts, width, num_experts, routing, top_k)

    def forward(self, a_xH: Tensor, rows: BankRows) -> Tensor:
        gates_xM = self.router(a_xH, rows)
        # 1 + s @ (L - 1) rather than s @ L: exactly 1 while L = 1 (see MoVScaler), one grouped matmul of width M.
        v_xH = 1.0 + rows.matmul(gates_xM, self.experts_EMH - 1.0)
        return a_xH * v_xH.to(a_xH.dtype)
