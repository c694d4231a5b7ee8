"""Grouped matrix multiply: rows of ``x`` in expert order times each expert's weight matrix.

A pure-torch reference (split rows, one ``mm`` per expert on views taken once with ``unbind``) and two faster
paths behind the same signature; tests check they agree:

- ``torch._grouped_mm``: a CUTLASS grouped GEMM on Hopper (and newer) GPUs in bf16, with the int32 cumulative
  offsets read on the device (no host sync, no padding); on CPU a loop of ``mm`` into one preallocated output.
- a padded batched matmul for GPUs or dtypes ``_grouped_mm`` does not cover: rows are copied into an
  ``[E, max_rows, D]`` buffer, one ``bmm`` runs every expert, and the rows are gathered back. It costs one host
  sync (the largest group) and the padding FLOPs, but no Python loop over experts.

``grouped_mm(..., backend="auto")`` picks the best of these for the tensors' device and dtype.

Indexing ``w[e]`` inside a Python loop is avoided on purpose: each such ``SelectBackward`` materialises a
full-size zero gradient of the whole bank (docs/ALGORITHMS.md section 17.3, the per-expert indexing trap).

Shape legend: A rows (kept assignments, in expert order), D input width, F output width, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "grouped_mm",
    "grouped_mm_padded",
    "grouped_mm_reference",
    "has_fast_grouped_mm",
    "pick_backend",
]

BACKENDS = ("auto", "grouped", "padded", "reference")

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


def grouped_mm_padded(x_AD: Tensor, w_EDF: Tensor, counts_E: Tensor, offsets_E: Tensor | None = None) -> Tensor:
    """Pad every group to the largest one, run one ``bmm`` over ``[E, max_rows, D]``, gather the rows back."""
    E, A = w_EDF.shape[0], x_AD.shape[0]
    if A == 0:
        return x_AD.new_zeros(0, w_EDF.shape[-1]) + 0.0 * w_EDF.sum()
    counts_E = counts_E.to(torch.int64)
    max_rows = int(counts_E.max())  # the one host sync of this path
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_A = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts_E, output_size=A)
    dest_A = expert_A * max_rows + (torch.arange(A, device=x_AD.device) - starts_E[expert_A])
    x_pad = x_AD.new_zeros(E * max_rows, x_AD.shape[-1]).index_copy(0, dest_A, x_AD)
    y_pad = torch.bmm(x_pad.view(E, max_rows, -1), w_EDF)
    return y_pad.view(E * max_rows, -1).index_select(0, dest_A)


def has_fast_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def _cuda_grouped_ok(x_AD: Tensor) -> bool:
    """CUTLASS grouped GEMM: bf16 on compute capability 9.0+ (Hopper, Blackwell)."""
    if x_AD.dtype != torch.bfloat16 or not has_fast_grouped_mm():
        return False
    major, _ = torch.cuda.get_device_capability(x_AD.device)
    return major >= 9


def _fast_ok(x_AD: Tensor, w_EDF: Tensor) -> bool:
    if not has_fast_grouped_mm() or x_AD.dtype not in (torch.float32, torch.bfloat16):
        return False
    if w_EDF.dtype != x_AD.dtype or x_AD.shape[0] == 0:
        return False
    elt = x_AD.element_size()
    return (x_AD.shape[-1] * elt) % _ALIGN_BYTES == 0 and (w_EDF.shape[-1] * elt) % _ALIGN_BYTES == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The backward of ``torch._grouped_mm`` raises "Invalid strides/sizes" or "strides should be multiple of 16
    bytes" when the incoming gradient is not contiguous, e.g. the expanded gradient of ``y.sum()`` or a transposed
    one. The reference path accepts any gradient layout.
    """

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def pick_backend(x_AD: Tensor, w_EDF: Tensor) -> str:
    """The backend ``grouped_mm(..., backend="auto")`` uses for these tensors."""
    if not _fast_ok(x_AD, w_EDF):
        return "padded" if x_AD.is_cuda and x_AD.shape[0] > 0 else "reference"
    if x_AD.is_cuda and not _cuda_grouped_ok(x_AD):
        return "padded"
    return "grouped"


def grouped_mm(
    x_AD: Tensor, w_EDF: Tensor, counts_E: Tensor, offsets_E: Tensor | None = None, *, backend: str = "auto"
) -> Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` by the fastest path available (all paths give the same result).

    Args:
        x_AD: rows sorted by expert, float32 or bf16 (other dtypes use the reference).
        w_EDF: stacked expert weights.
        counts_E: int rows per expert, on the same device as ``x_AD``.
        offsets_E: optional int32 cumulative row counts (``counts_E.cumsum()``), to reuse across calls.
        backend: "auto", or force "grouped" (``torch._grouped_mm``), "padded" or "reference".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = pick_backend(x_AD, w_EDF)
    if backend == "reference":
        return grouped_mm_reference(x_AD, w_EDF, counts_E)
    if backend == "padded":
        return grouped_mm_padded(x_AD, w_EDF, counts_E)
    if offsets_E is None:
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    y_AF = torch._grouped_mm(x_AD.contiguous(), w_EDF, offs=offsets_E)
    return _ContiguousGrad.apply(y_AF) if y_AF.requires_grad else y_AF
