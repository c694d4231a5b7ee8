"""Grouped matrix multiply: rows of ``x`` in expert order times each expert's weight matrix.

A pure-torch reference (split rows, one ``mm`` per expert on views taken once with ``unbind``) and a fast path
(``torch._grouped_mm``: a CUTLASS grouped GEMM on Hopper GPUs, a single preallocated-output loop on CPU) behind the
same signature; tests check they agree. Indexing ``w[e]`` inside a Python loop is avoided on purpose: each such
``SelectBackward`` materialises a full-size zero gradient of the whole bank (PERFORMANCE.md, the HF Mixtral trap).

Shape legend: A rows (kept assignments, in expert order), D input width, F output width, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_mm", "grouped_mm_reference", "has_fast_grouped_mm"]

_ALIGN_BYTES = 16  # torch._grouped_mm needs every stride to be a multiple of 16 bytes


def grouped_mm_reference(x_AD: Tensor, w_EDF: Tensor, counts_E: Tensor, offsets_E: Tensor | None = None) -> Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` with one ``mm`` per expert. ``counts_E`` (int) sums to A."""
    sizes = counts_E.tolist()
    if sum(sizes) != x_AD.shape[0]:
        raise ValueError(f"counts_E sums to {sum(sizes)} but x_AD has {x_AD.shape[0]} rows")
    out_AF = x_AD.new_empty(x_AD.shape[0], w_EDF.shape[-1])
    if x_AD.shape[0] == 0:
        # Keep the graph connected so an all-dropped call still yields (zero) gradients for the weights.
        return out_AF.zero_() + 0.0 * w_EDF.sum()
    pieces = [xe @ we for xe, we in zip(torch.split(x_AD, sizes), w_EDF.unbind(0), strict=True) if xe.shape[0]]
    return torch.cat(pieces, dim=0)


def has_fast_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def _fast_ok(x_AD: Tensor, w_EDF: Tensor) -> bool:
    if not has_fast_grouped_mm() or x_AD.dtype not in (torch.float32, torch.bfloat16):
        return False
    if w_EDF.dtype != x_AD.dtype or x_AD.shape[0] == 0:
        return False
    elt = x_AD.element_size()
    return (x_AD.shape[-1] * elt) % _ALIGN_BYTES == 0 and (w_EDF.shape[-1] * elt) % _ALIGN_BYTES == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    Fix (found by tests/ops/test_grouped_mm.py): the backward of ``torch._grouped_mm`` raises "Invalid
    strides/sizes" or "strides should be multiple of 16 bytes" when the incoming gradient is not
    contiguous, e.g. the expanded gradient of ``y.sum()`` or a transposed one. The reference path accepts
    any gradient layout.
    """

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm(x_AD: Tensor, w_EDF: Tensor, counts_E: Tensor, offsets_E: Tensor | None = None) -> Tensor:
    """Fast grouped matmul where ``torch._grouped_mm`` applies, the reference otherwise (same result).

    Args:
        x_AD: rows sorted by expert, float32 or bf16.
        w_EDF: stacked expert weights.
        counts_E: int rows per expert.
        offsets_E: optional int32 cumulative row counts (``counts_E.cumsum()``), to reuse across calls.
    """
    if not _fast_ok(x_AD, w_EDF):
        return grouped_mm_reference(x_AD, w_EDF, counts_E)
    if offsets_E is None:
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    y_AF = torch._grouped_mm(x_AD.contiguous(), w_EDF, offs=offsets_E)
    return _ContiguousGrad.apply(y_AF) if y_AF.requires_grad else y_AF
