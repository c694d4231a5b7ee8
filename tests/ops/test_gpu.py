"""GPU path: bf16 layers on CUDA equal the float32 CPU reference within bf16 tolerance (skipped without a GPU).

The CPU reference routes the same bf16-rounded inputs in float32, so both sides make the same routing decisions;
differences come only from bf16 expert math.
"""

import pytest
import torch

from moekit import MoE, MoEConfig, SoftMoE, SoftMoEConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [
    ("topk", 1, None),
    ("topk", 1, 1.0),
    ("topk", 2, None),
    ("topk", 2, 1.0),
    ("expert_choice", 1, 1.0),
    ("expert_choice", 1, 2.0),
]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().norm().clamp_min(1e-12))


def _compare(layer_cpu: torch.nn.Module, x_cpu: torch.Tensor) -> dict[str, float]:
    """Relative errors of the bf16 CUDA run against the float32 CPU run: output, input grad, each param grad."""
    layer_gpu = type(layer_cpu)(layer_cpu.config).cuda()
    layer_gpu.load_state_dict(layer_cpu.state_dict())
    x_gpu = x_cpu.detach().cuda().requires_grad_(True)
    y_cpu, _ = layer_cpu(x_cpu)
    y_cpu.square().sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_gpu, aux = layer_gpu(x_gpu)
    errors = {"max_logit_is_float32": float(aux.max_logit.dtype == torch.float32)}
    y_gpu.float().square().sum().backward()
    errors["y"] = _rel_err(y_gpu, y_cpu)
    errors["x.grad"] = _rel_err(x_gpu.grad, x_cpu.grad)
    for (name, p_cpu), p_gpu in zip(layer_cpu.named_parameters(), layer_gpu.parameters(), strict=True):
        errors[name + ".grad"] = _rel_err(p_gpu.grad, p_cpu.grad)
    return errors


def _assert_within_bf16(errors: dict[str, float]) -> None:
    assert errors.pop("max_logit_is_float32") == 1.0  # the router stays float32 under autocast
    assert errors.pop("y") < 2e-2
    bad = {k: v for k, v in errors.items() if not v < 3e-2}
    assert not bad, bad


@pytest.mark.parametrize("router,k,cf", CASES)
def test_moe_bf16_cuda_matches_float32_cpu(router, k, cf):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=k, capacity_factor=cf, router=router,
                          activation="swiglu"))
    x = torch.randn(4, 64, 64).bfloat16().float().requires_grad_(True)
    errors = _compare(layer, x)
    assert set(errors) >= {"y", "x.grad", "router.weight.grad", "experts.w_in.grad"}
    _assert_within_bf16(errors)


@pytest.mark.parametrize("slots", [1, 4])
def test_soft_moe_bf16_cuda_matches_float32_cpu(slots):
    torch.manual_seed(0)
    layer = SoftMoE(SoftMoEConfig(d_model=64, d_ff=128, num_experts=8, slots_per_expert=slots))
    x = torch.randn(4, 32, 64).bfloat16().float().requires_grad_(True)
    errors = _compare(layer, x)
    assert set(errors) >= {"y", "x.grad", "router.phi.grad", "router.scale.grad"}
    _assert_within_bf16(errors)


def test_cuda_backend_choice():
    from moekit.ops import pick_backend

    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    major, _ = torch.cuda.get_device_capability()
    assert pick_backend(x, w) == ("grouped" if major >= 9 else "padded")
    assert pick_backend(x.float(), w.float()) == "padded"
