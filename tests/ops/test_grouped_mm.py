"""The fast grouped matmul (torch._grouped_mm) equals the reference: values, gradients, zero-row experts."""

from __future__ import annotations

import pytest
import torch

from moekit.ops import grouped_mm, grouped_mm_reference, has_fast_grouped_mm
from moekit.ops.grouped_mm import _fast_ok

needs_fast = pytest.mark.skipif(not has_fast_grouped_mm(), reason="torch._grouped_mm not available")


def _naive(x, w, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        for i in range(start, start + n):
            out.append(x[i] @ w[e])
        start += n
    return torch.stack(out) if out else x.new_zeros(0, w.shape[-1])


def _run(fn, x, w, counts, g):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = fn(x, w, torch.tensor(counts))
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_reference_golden():
    # Expert 0: [1, 2] @ [[1, 0], [0, 1]] = [1, 2]; expert 1: [3, 4] @ [[2, 0], [0, 3]] = [6, 12]
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]])
    y = grouped_mm_reference(x, w, torch.tensor([1, 1]))
    assert y.tolist() == [[1.0, 2.0], [6.0, 12.0]]


@needs_fast
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [4, 3, 2, 1], [0, 1, 0, 0]])
def test_fast_equals_reference_with_zero_row_experts(counts):
    A = sum(counts)
    x, w, g = torch.randn(A, 8), torch.randn(4, 8, 12), torch.randn(A, 12)
    assert _fast_ok(x, w)
    y_f, gx_f, gw_f = _run(grouped_mm, x, w, counts, g)
    y_r, gx_r, gw_r = _run(grouped_mm_reference, x, w, counts, g)
    torch.testing.assert_close(y_f, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw_f, gw_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_r, _naive(x, w, counts), rtol=1e-5, atol=1e-5)
    # An expert with no rows gets an exactly zero weight gradient.
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(gw_f[e], torch.zeros(8, 12))
            assert torch.equal(gw_r[e], torch.zeros(8, 12))


@needs_fast
def test_fast_backward_accepts_non_contiguous_gradients():
    # Regression: torch._grouped_mm's backward rejected the expanded gradient of y.sum() and transposed
    # gradients ("Invalid strides/sizes", "strides should be multiple of 16 bytes").
    counts = [2, 0, 4]
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)
    ones = torch.ones(6, 4)
    for g in (ones.expand(6, 4), torch.ones(1, 1).expand(6, 4), torch.randn(4, 6).t()):
        y_f, gx_f, gw_f = _run(grouped_mm, x, w, counts, g)
        y_r, gx_r, gw_r = _run(grouped_mm_reference, x, w, counts, g)
        torch.testing.assert_close(gx_f, gx_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw_f, gw_r, rtol=1e-5, atol=1e-5)
    xr = x.clone().requires_grad_(True)
    grouped_mm(xr, w, torch.tensor(counts)).sum().backward()
    torch.testing.assert_close(xr.grad, w.sum(-1)[[0, 0, 2, 2, 2, 2]], rtol=1e-5, atol=1e-5)


@needs_fast
def test_fast_bf16_close_to_float32():
    counts = [5, 0, 3]
    x, w = torch.randn(8, 16), torch.randn(3, 16, 8)
    y = grouped_mm(x.bfloat16(), w.bfloat16(), torch.tensor(counts))
    assert y.dtype == torch.bfloat16
    expected = grouped_mm_reference(x, w, torch.tensor(counts))
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=0.15)


def test_float64_and_unaligned_take_the_reference_path():
    # float64 is not supported by the fast path, nor widths whose rows are not a multiple of 16 bytes.
    assert not _fast_ok(torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, 4, dtype=torch.float64))
    assert not _fast_ok(torch.randn(4, 3), torch.randn(2, 3, 4))
    assert not _fast_ok(torch.randn(4, 8), torch.randn(2, 8, 5))
    assert not _fast_ok(torch.randn(0, 8), torch.randn(2, 8, 4))
    counts = [3, 1]
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    y = grouped_mm(x, w, torch.tensor(counts))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _naive(x, w, counts))


def test_no_rows_keeps_weights_in_graph():
    w = torch.randn(3, 8, 4, requires_grad=True)
    y = grouped_mm(torch.zeros(0, 8), w, torch.tensor([0, 0, 0]))
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, 8, 4))


def test_reference_rejects_wrong_counts():
    with pytest.raises(ValueError, match="counts_E sums to 5 but x_AD has 4 rows"):
        grouped_mm_reference(torch.randn(4, 2), torch.randn(2, 2, 2), torch.tensor([2, 3]))
