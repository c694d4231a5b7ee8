"""Every grouped-matmul backend computes the same thing: padded bmm and torch._grouped_mm against the reference."""

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.ops import grouped_mm, grouped_mm_padded, grouped_mm_reference, pick_backend


def _case(counts, D=8, F=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts_E = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(int(counts_E.sum()), D, generator=g, requires_grad=True)
    w = torch.randn(len(counts), D, F, generator=g, requires_grad=True)
    return x, w, counts_E


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [2, 2, 2, 2], [1]])
def test_padded_equals_reference_outputs_and_grads(counts):
    x, w, c = _case(counts)
    grad = torch.randn(x.shape[0], w.shape[-1], generator=torch.Generator().manual_seed(1))
    y_ref = grouped_mm_reference(x, w, c)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), grad)
    y_pad = grouped_mm_padded(x, w, c)
    gx_pad, gw_pad = torch.autograd.grad(y_pad, (x, w), grad)
    torch.testing.assert_close(y_pad, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_pad, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw_pad, gw_ref, rtol=1e-5, atol=1e-5)
    # An expert that got no rows gets an exactly-zero weight gradient.
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(gw_pad[e]) == 0


def test_padded_handles_no_rows():
    x, w, c = _case([0, 0])
    y = grouped_mm_padded(x, w, c)
    assert y.shape == (0, 12)
    (gw,) = torch.autograd.grad(y.sum(), (w,), allow_unused=True)
    assert gw is not None and torch.count_nonzero(gw) == 0


def test_backend_choice_on_cpu():
    x, w, c = _case([2, 2])  # D = 8, F = 12: float32 rows are 32 / 48 bytes, 16-byte aligned
    assert pick_backend(x, w) == "grouped"
    assert pick_backend(x.double(), w.double()) == "reference"
    x_odd = torch.randn(4, 6)
    w_odd = torch.randn(2, 6, 12)
    assert pick_backend(x_odd, w_odd) == "reference"  # 24-byte rows: not 16-byte aligned
    with pytest.raises(ValueError, match="backend"):
        grouped_mm(x, w, c, backend="cutlass")


@pytest.mark.parametrize("backend", ["grouped", "padded", "reference"])
@pytest.mark.parametrize("top_k,cf", [(1, None), (2, 1.0)])
def test_moe_layer_same_under_every_backend(backend, top_k, cf):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=top_k, capacity_factor=cf))
    x = torch.randn(2, 9, 16, requires_grad=True)
    layer.experts.backend = "reference"
    y_ref, _ = layer(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), (x, layer.experts.w_in, layer.router.weight))
    layer.experts.backend = backend
    y, _ = layer(x)
    g = torch.autograd.grad(y.square().sum(), (x, layer.experts.w_in, layer.router.weight))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
