"""The expert weights as one stacked bank ``[E, ...]``, run with a grouped matmul.

Stacking (rather than an ``nn.ModuleList`` of FFNs) lets one kernel run every expert, lets an expert-parallel
rank own a slice ``[E_local, ...]``, and keeps checkpoints as a handful of large tensors.

Gated banks keep ``w_gate`` and ``w_in`` side by side in one ``[E, D, 2F]`` storage (each parameter a strided
``[E, D, F]`` view of it: gate columns first, then up), so that the fused path (``experts/fused.py``) runs both
projections as one grouped GEMM, forward and for the input gradient, without copying weights. They stay two
ordinary parameters with their own names, gradients and state-dict keys (checkpoints are unchanged); anything that
replaces, casts or slices them apart only loses the fusion (the unfused path runs), and ``.to()`` / ``.cuda()``
re-pair them.

Shape legend: A rows in expert order, D model width, F expert hidden width, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.experts.activations import GATED, check_activation
from moekit.experts.ffn import feed_forward
from moekit.experts.fused import expert_ffn, fused_ok, gate_up_view
from moekit.init import switch_init_
from moekit.ops.grouped_mm import grouped_mm

__all__ = ["ExpertBank"]


class ExpertBank(nn.Module):
    """E feed-forward experts: ``w_out(dropout(act(x @ w_in)))``, or gated ``act(x @ w_gate) * (x @ w_in)``.

    Args:
        num_experts: E.
        d_model: D.
        d_ff: F, the hidden width of each expert.
        activation: "relu", "gelu" (exact erf), "swiglu" or "geglu".
        init_scale: Switch init, std = sqrt(init_scale / fan_in) (0.1 for MoE models).
        dropout: expert dropout on the hidden activation (Switch fine-tuning uses 0.4).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        *,
        init_scale: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expert dropout must be in [0, 1), got {dropout}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = activation
        self.init_scale = float(init_scale)
        self.dropout = float(dropout)
        if activation in GATED:
            gate_up_ED2F = torch.empty(num_experts, d_model, 2 * d_ff)
            self.w_in = nn.Parameter(gate_up_ED2F[..., d_ff:])
            self.w_gate = nn.Parameter(gate_up_ED2F[..., :d_ff])
        else:
            self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
            self.w_gate = None
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        # Which grouped-matmul path runs the experts (moekit.ops.BACKENDS); "auto" picks by device and dtype.
        self.backend = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Drawn into contiguous tensors and copied, so a seed gives the same weights as before the paired layout.
        for w in (self.w_in, self.w_gate):
            if w is not None:
                with torch.no_grad():
                    w.copy_(switch_init_(torch.empty(w.shape), fan_in=self.d_model, init_scale=self.init_scale))
        switch_init_(self.w_out, fan_in=self.d_ff, init_scale=self.init_scale)

    @property
    def gate_up_paired(self) -> bool:
        """Whether ``w_gate`` and ``w_in`` share one ``[E, D, 2F]`` storage (the fused path's single GEMM)."""
        return self.w_gate is not None and gate_up_view(self.w_gate, self.w_in) is not None

    def pair_gate_up_(self) -> None:
        """Put ``w_gate`` and ``w_in`` back side by side in one storage (same parameter objects, same values)."""
        if self.w_gate is None or self.gate_up_paired:
            return
        F = self.w_in.shape[-1]
        with torch.no_grad():
            gate_up_ED2F = torch.cat([self.w_gate.detach(), self.w_in.detach()], dim=-1)
        self.w_gate.data = gate_up_ED2F[..., :F]
        self.w_in.data = gate_up_ED2F[..., F:]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to(dtype) / .cuda() give each parameter its own new tensor: pair gate and up again afterwards.
        out = super()._apply(fn, recurse)
        if self.w_gate is not None and self.w_gate.shape == self.w_in.shape:
            self.pair_gate_up_()
        return out

    def forward(self, x_AD: Tensor, tokens_per_expert_E: Tensor, rows_per_expert: int | None = None) -> Tensor:
        """Run rows ``x_AD`` (sorted by expert, ``tokens_per_expert_E`` rows each) through their experts.

        ``rows_per_expert``, when every expert has that many rows (expert choice, Soft MoE), runs one batched
        matmul instead of the grouped one.
        """
        if rows_per_expert is not None:
            E = self.w_in.shape[0]
            return self.forward_slots(x_AD.view(E, rows_per_expert, x_AD.shape[-1])).view(E * rows_per_expert, -1)
        offsets_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        if self.backend in ("auto", "grouped") and fused_ok(
            x_AD, self.w_in, self.w_out, self.activation, self.dropout, self.training
        ):
            return expert_ffn(x_AD, self.w_in, self.w_gate, self.w_out, offsets_E, self.activation)

        def matmul(a: Tensor, w: Tensor) -> Tensor:
            return grouped_mm(a, w, tokens_per_expert_E, offsets_E, backend=self.backend)

        return self._ffn(x_AD, matmul)

    def forward_slots(self, x_END: Tensor) -> Tensor:
        """Run a fixed number N of rows per expert, ``[E, N, D] -> [E, N, D]``: a plain batched matmul."""
        return self._ffn(x_END, torch.bmm)

    def _ffn(self, x: Tensor, matmul) -> Tensor:
        return feed_forward(
            x, self.w_in, self.w_gate, self.w_out, self.activation,
            dropout=self.dropout, training=self.training, matmul=matmul,
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"
