"""The expert FFN of a bank as two autograd functions, for the grouped-matmul path on CPU.

Why: autograd over ``feed_forward`` runs three grouped GEMMs forward (gate, up, down), keeps five ``[A, F]``-sized
tensors alive for the backward (the rows, both projections, the activation and the product) and materialises every
intermediate gradient on its own. Here:

- gate and up are one GEMM against a ``[E, D, 2F]`` view when the bank keeps ``w_gate`` and ``w_in`` side by side
  in one storage (``ExpertBank`` allocates them so); the input gradient of both is one GEMM too;
- only the rows ``x`` and the pre-activation ``h = [x w_gate | x w_in]`` are saved; the activation and the product
  are recomputed in the backward (an elementwise pass, cheaper than keeping two more ``[A, F]`` tensors that the
  default glibc allocator page-faults afresh every step);
- the gradient of both projections is written straight into one ``[A, 2F]`` buffer, and each weight gradient is a
  contiguous ``[E, D, F]`` tensor that autograd hands to ``.grad`` without a copy;
- ``x -> h`` and ``h -> y`` are separate autograd nodes, so autograd frees ``h`` between them in the backward and
  the step's peak holds the weight gradients and one ``[A, 2F]`` gradient, not ``h`` as well: the live-tensor
  peak of transformers' Mixtral block, give or take the router's ``[S, E]`` logits
  (benchmarks/results/layer_memory.md).

The math, and the elementwise kernels used, are those of ``feed_forward`` (the activation's own aten backward);
only the grouping of the GEMMs differs, so results agree to float rounding (tests/experts/test_fused.py).

Shape legend: A rows in expert order, D model width, F expert hidden width, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.experts.activations import ACTIVATIONS

__all__ = ["expert_ffn", "fused_ok", "gate_up_view"]

# The aten backward of each activation: (grad wrt act's output, act's input) -> grad wrt act's input.
_GELU_APPROX = {"gelu": "none", "geglu": "none", "gelu_tanh": "tanh", "geglu_tanh": "tanh"}


def _act_backward(activation: str, grad: Tensor, h: Tensor, out: Tensor | None = None) -> Tensor:
    """``act'(h) * grad``, the aten backward of the activation; written into ``out`` (which may be a strided slice)
    when given, so the gated backward needs no ``[A, F]`` temporary."""
    if activation == "swiglu":
        op, args, kwargs = torch.ops.aten.silu_backward, (grad, h), {}
    elif activation == "relu":  # relu's mask from its input equals the mask from its output
        op, args, kwargs = torch.ops.aten.threshold_backward, (grad, h, 0), {}
    else:
        op, args, kwargs = torch.ops.aten.gelu_backward, (grad, h), {"approximate": _GELU_APPROX[activation]}
    if out is None:
        return op.default(*args, **kwargs)
    return op.grad_input(*args, **kwargs, grad_input=out)


def _act_into(activation: str, h: Tensor, out: Tensor) -> None:
    """``out = act(h)`` written in place (``out`` may be a strided slice): gated activations only."""
    if activation == "swiglu":
        torch.ops.aten.silu.out(h, out=out)
    else:
        torch.ops.aten.gelu.out(h, approximate=_GELU_APPROX[activation], out=out)


def gate_up_view(w_gate_EDF: Tensor, w_in_EDF: Tensor) -> Tensor | None:
    """``[w_gate | w_in]`` as one ``[E, D, 2F]`` view without a copy, when ``w_in`` sits right after ``w_gate`` in
    one storage (rows of 2F: gate then up); else None (the weights were replaced, cast or sliced apart)."""
    E, D, Fh = w_gate_EDF.shape
    stride = (D * 2 * Fh, 2 * Fh, 1)
    if (
        w_in_EDF.shape != w_gate_EDF.shape
        or w_gate_EDF.dtype != w_in_EDF.dtype
        or w_gate_EDF.device != w_in_EDF.device
        or w_gate_EDF.stride() != stride
        or w_in_EDF.stride() != stride
        or w_gate_EDF.untyped_storage().data_ptr() != w_in_EDF.untyped_storage().data_ptr()
        or w_in_EDF.storage_offset() != w_gate_EDF.storage_offset() + Fh
    ):
        return None
    return w_gate_EDF.detach().as_strided((E, D, 2 * Fh), stride, w_gate_EDF.storage_offset())


def _gmm(a: Tensor, b: Tensor, offsets_E: Tensor) -> Tensor:
    """``torch._grouped_mm``: ``[A, K] x [E, K, N] -> [A, N]``, or ``[K, A] x [A, N] -> [E, K, N]`` (a per-expert
    sum over each expert's rows: the weight gradient)."""
    return torch._grouped_mm(a, b, offs=offsets_E)


class _GateUp(torch.autograd.Function):
    """``h = [x w_gate | x w_in]`` (gated) or ``h = x w_in``: the first half of the expert FFN, its own autograd node.

    Two nodes rather than one so that autograd frees ``h`` (saved by :class:`_ActDown`) as soon as the second half's
    backward has run, before this node writes its weight gradients: the step's peak is then the weight gradients
    plus one ``[A, 2F]`` gradient, not plus ``h`` as well. With ``retain_graph=True`` autograd keeps it, as it
    should."""

    @staticmethod
    def forward(ctx, x_AD: Tensor, w_in_EDF: Tensor, w_gate_EDF: Tensor | None, offsets_E: Tensor) -> Tensor:  # type: ignore[override]
        if w_gate_EDF is None:
            h_AF = _gmm(x_AD, w_in_EDF, offsets_E)
        else:
            w_up = gate_up_view(w_gate_EDF, w_in_EDF)
            if w_up is not None:
                h_AF = _gmm(x_AD, w_up, offsets_E)  # [A, 2F]: gate, then up
            else:
                h_AF = torch.cat([_gmm(x_AD, w_gate_EDF, offsets_E), _gmm(x_AD, w_in_EDF, offsets_E)], dim=1)
        ctx.save_for_backward(x_AD, w_in_EDF, w_gate_EDF, offsets_E)
        return h_AF

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h_AF: Tensor):  # type: ignore[override]
        x_AD, w_in_EDF, w_gate_EDF, offsets_E = ctx.saved_tensors
        need_x, need_in, need_gate = ctx.needs_input_grad[:3]
        grad_h_AF = grad_h_AF.contiguous()
        Fh = w_in_EDF.shape[-1]
        gated = w_gate_EDF is not None
        grad_x = grad_in = grad_gate = None
        # Two weight-gradient GEMMs, not one into a [E, D, 2F] buffer: each parameter then gets its own contiguous
        # gradient, which autograd hands to .grad without a copy. They come before the input gradient, whose
        # [A, D] buffer can then reuse memory freed since the forward rather than add to the peak.
        x_DA = x_AD.t()
        if need_in:
            grad_in = _gmm(x_DA, grad_h_AF[:, Fh:] if gated else grad_h_AF, offsets_E)
        if gated and need_gate:
            grad_gate = _gmm(x_DA, grad_h_AF[:, :Fh], offsets_E)
        if need_x:
            if not gated:
                grad_x = _gmm(grad_h_AF, w_in_EDF.transpose(1, 2), offsets_E)
            else:
                w_up = gate_up_view(w_gate_EDF, w_in_EDF)
                if w_up is not None:
                    grad_x = _gmm(grad_h_AF, w_up.transpose(1, 2), offsets_E)
                else:
                    grad_x = _gmm(grad_h_AF[:, :Fh], w_gate_EDF.transpose(1, 2), offsets_E)
                    grad_x += _gmm(grad_h_AF[:, Fh:], w_in_EDF.transpose(1, 2), offsets_E)
        return grad_x, grad_in, grad_gate, None


class _ActDown(torch.autograd.Function):
    """``y = (act(gate) * up) w_out`` or ``y = act(h) w_out`` from :class:`_GateUp`'s ``h``: the second half. Only
    ``h`` is saved; the activation and the product are recomputed in the backward."""

    @staticmethod
    def forward(ctx, h_AF: Tensor, w_out_EFD: Tensor, offsets_E: Tensor, activation: str, gated: bool) -> Tensor:  # type: ignore[override]
        act = ACTIVATIONS[activation]
        if gated:
            Fh = h_AF.shape[1] // 2
            a_AF = act(h_AF[:, :Fh])
            a_AF.mul_(h_AF[:, Fh:])
        else:
            a_AF = act(h_AF)
        y_AD = _gmm(a_AF, w_out_EFD, offsets_E)
        ctx.save_for_backward(h_AF, w_out_EFD, offsets_E)
        ctx.activation, ctx.gated = activation, gated
        return y_AD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_AD: Tensor):  # type: ignore[override]
        h_AF, w_out_EFD, offsets_E = ctx.saved_tensors
        activation, gated = ctx.activation, ctx.gated
        act = ACTIVATIONS[activation]
        need_h, need_out = ctx.needs_input_grad[:2]
        grad_AD = grad_AD.contiguous()  # _grouped_mm wants 16-byte-aligned strides (e.g. not y.sum()'s expand)
        Fh = w_out_EFD.shape[1]
        if not gated:
            actg_AF = act(h_AF)  # recomputed, not saved
            grad_w_out = _gmm(actg_AF.t(), grad_AD, offsets_E) if need_out else None
            del actg_AF
            if not need_h:
                return None, grad_w_out, None, None, None
            grad_a_AF = _gmm(grad_AD, w_out_EFD.transpose(1, 2), offsets_E)
            return _act_backward(activation, grad_a_AF, h_AF), grad_w_out, None, None, None
        # Gated: the [A, 2F] gradient buffer doubles as scratch, so that no [A, F] temporary is alive beside it and
        # h: its up half first holds act(gate), its gate half the product a = act(gate) * up for the w_out gradient.
        g_AF, u_AF = h_AF[:, :Fh], h_AF[:, Fh:]
        grad_h_AF = torch.empty_like(h_AF)
        dgate_AF, dup_AF = grad_h_AF[:, :Fh], grad_h_AF[:, Fh:]
        _act_into(activation, g_AF, dup_AF)  # act(gate), recomputed rather than saved
        grad_w_out = None
        if need_out:
            torch.mul(dup_AF, u_AF, out=dgate_AF)
            grad_w_out = _gmm(dgate_AF.t(), grad_AD, offsets_E)
        if not need_h:
            return None, grad_w_out, None, None, None
        grad_a_AF = _gmm(grad_AD, w_out_EFD.transpose(1, 2), offsets_E)
        dup_AF.mul_(grad_a_AF)  # d/d up = grad_a * act(gate)
        grad_a_AF.mul_(u_AF)
        _act_backward(activation, grad_a_AF, g_AF, out=dgate_AF)  # d/d gate = act'(gate) * grad_a * up
        return grad_h_AF, grad_w_out, None, None, None


def expert_ffn(
    x_AD: Tensor, w_in_EDF: Tensor, w_gate_EDF: Tensor | None, w_out_EFD: Tensor, offsets_E: Tensor,
    activation: str,
) -> Tensor:
    """The bank's FFN on rows in expert order (``offsets_E``: int32 cumulative rows per expert) by
    ``torch._grouped_mm``, with the fused backward of this module. Callers check :func:`fused_ok` first."""
    h_AF = _GateUp.apply(x_AD.contiguous(), w_in_EDF, w_gate_EDF, offsets_E)
    return _ActDown.apply(h_AF, w_out_EFD, offsets_E, activation, w_gate_EDF is not None)


def fused_ok(x_AD: Tensor, w_in_EDF: Tensor, w_out_EFD: Tensor, activation: str, dropout: float,
             training: bool) -> bool:
    """Whether :func:`expert_ffn` covers this call: CPU, float32 or bf16 rows in the weights' dtype, 16-byte aligned
    widths, at least one row, no active dropout, and a known activation (CUDA keeps autograd over
    ``grouped_mm``: this path is not measured there)."""
    if not hasattr(torch, "_grouped_mm") or x_AD.device.type != "cpu" or x_AD.shape[0] == 0:
        return False
    if x_AD.dtype not in (torch.float32, torch.bfloat16) or w_in_EDF.dtype != x_AD.dtype:
        return False
    if w_out_EFD.dtype != x_AD.dtype or (dropout > 0 and training):
        return False
    if activation not in ACTIVATIONS:
        return False
    elt = x_AD.element_size()
    return (x_AD.shape[-1] * elt) % 16 == 0 and (w_in_EDF.shape[-1] * elt) % 16 == 0

