"""Adapters on expert banks: moekit's ExpertBank and transformers v5 fused experts (docs/ALGORITHMS.md 5.10).

Every adapted bank is checked against a per-expert reference written here as a plain Python loop over experts (one
``x @ w[e]`` per expert with that expert's adapter tensors), in outputs and in gradients w.r.t. the input and every
adapter parameter; identity at init holds to float rounding (the frozen bank fuses gate and up); merging is checked
against the adapted output.

Shape legend: S tokens, K choices per token, D model width, F expert hidden width, E bank experts, N rows per expert.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _adapter_models import MOE_FAMILIES, tiny_moe_config, tiny_moe_lm
from torch import Tensor

from moekit import MoE, MoEConfig, SoftMoE, SoftMoEConfig
from moekit.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_sites,
    apply_adapters,
    iter_adapters,
    load_adapters,
    merge_adapters,
    record_router_probs,
    save_adapters,
)
from moekit.adapters.bank import BankIA3, BankLoRA, BankMoLoRA, BankMoV, BankRouter
from moekit.errors import MoekitError

D, FF, E = 16, 24, 4
RTOL, ATOL = 1e-5, 1e-5
BANK_CONFIGS = [
    LoRAConfig(r=4, alpha=8.0),
    IA3Config(),
    MoLoRAConfig(num_experts=3, r=2, alpha=4.0),
    MoLoRAConfig(num_experts=4, r=4, routing="topk", top_k=2),
    MoVConfig(num_experts=4),
    MoVConfig(num_experts=3, routing="topk", top_k=1),
]


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Moves every adapter parameter away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, adapter in iter_adapters(model):
            for p in adapter.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _adapter_params(model: torch.nn.Module) -> dict[str, Tensor]:
    return {f"{n}.{k}": p for n, _, a in iter_adapters(model) for k, p in a.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# The per-expert reference: a plain loop over experts with expert e's adapter tensors.
# ---------------------------------------------------------------------------------------------------------------


def _ref_gates(router: BankRouter, e: int, x_NI: Tensor) -> Tensor:
    probs_NM = torch.softmax(x_NI.float() @ router.weight_EIM[e], dim=-1)
    if router.routing == "soft":
        return probs_NM
    top_NK, ids_NK = probs_NM.topk(router.top_k, dim=-1)
    return torch.zeros_like(probs_NM).scatter(-1, ids_NK, top_NK / top_NK.sum(-1, keepdim=True))


def _ref_delta(site: torch.nn.Module, e: int, x_NI: Tensor) -> Tensor:
    if isinstance(site, BankLoRA):
        return site.scaling * (x_NI @ site.a_EIr[e]) @ site.b_ErO[e]
    assert isinstance(site, BankMoLoRA)
    g_NM = _ref_gates(site.router, e, x_NI)
    return site.scaling * sum(g_NM[:, m:m + 1] * ((x_NI @ site.a_EIMr[e, :, m]) @ site.b_EMrO[e, m])
                              for m in range(g_NM.shape[1]))


def _ref_scale(site: torch.nn.Module, e: int, a_NH: Tensor) -> Tensor:
    if isinstance(site, BankIA3):
        return a_NH * site.vector_EH[e]
    assert isinstance(site, BankMoV)
    return a_NH * (_ref_gates(site.router, e, a_NH) @ site.experts_EMH[e])


def _ref_project(adapter, name: str, e: int, x_NI: Tensor, w_IO: Tensor) -> Tensor:
    kind = adapter.site_kinds.get(name)
    site = adapter.sites[name] if kind else None
    if kind == "scale_input":
        x_NI = _ref_scale(site, e, x_NI)
    y_NO = x_NI @ w_IO
    if kind == "lora":
        y_NO = y_NO + _ref_delta(site, e, x_NI)
    if kind == "scale_output":
        y_NO = _ref_scale(site, e, y_NO)
    return y_NO


def _ref_moekit_expert(bank, e: int, x_ND: Tensor) -> Tensor:
    ad = bank.moekit_adapter
    act = F.silu if bank.activation == "swiglu" else (lambda t: F.gelu(t, approximate="none"))
    h_NF = _ref_project(ad, "w_in", e, x_ND, bank.w_in[e])
    if bank.w_gate is not None:
        h_NF = act(_ref_project(ad, "w_gate", e, x_ND, bank.w_gate[e])) * h_NF
    else:
        h_NF = act(h_NF)
    return _ref_project(ad, "w_out", e, h_NF, bank.w_out[e])


def _ref_hf_expert(experts, e: int, x_ND: Tensor) -> Tensor:
    ad = experts.moekit_adapter
    gate_NF, up_NF = _ref_project(ad, "gate_up_proj", e, x_ND, experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return _ref_project(ad, "down_proj", e, experts.act_fn(gate_NF) * up_NF, experts.down_proj[e].T)


def _close(a: Tensor, b: Tensor, rtol: float = RTOL, msg=None) -> None:
    """Relative to the tensor's scale: float32 sums of O(10) terms, differently ordered, differ by ~1e-6 of it."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=ATOL * max(1.0, float(b.detach().abs().max())), msg=msg)


def _assert_same_grads(y: Tensor, y_ref: Tensor, leaves: dict[str, Tensor]) -> None:
    _close(y, y_ref)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], cot, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [leaves[n] for n in names], cot, allow_unused=True)
    for n, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g is not None and g_ref is not None, n
        _close(g, g_ref, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# moekit banks.
# ---------------------------------------------------------------------------------------------------------------


def _moe(top_k: int = 2, activation: str = "swiglu", router: str = "topk", seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    cf = 2.0 if router == "expert_choice" else None
    cfg = MoEConfig(d_model=D, d_ff=FF, num_experts=E, top_k=top_k, capacity_factor=cf, activation=activation,
                    jitter_eps=0.0, router=router, init_scale=1.0)
    return MoE(cfg).eval()


def _soft_moe(seed: int = 0) -> SoftMoE:
    torch.manual_seed(seed)
    return SoftMoE(SoftMoEConfig(d_model=D, d_ff=FF, num_experts=E, slots_per_expert=2, activation="swiglu",
                                 init_scale=1.0)).eval()


def _x(shape=(2, 5, D), seed: int = 1) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


@pytest.mark.parametrize(("top_k", "activation"), [(1, "gelu"), (2, "swiglu")])
@pytest.mark.parametrize("config", BANK_CONFIGS, ids=repr)
def test_token_choice_bank_equals_reference_loop(config, top_k, activation):
    layer = apply_adapters(_moe(top_k, activation), config, ["experts"])
    _perturb(layer)
    x_BSD = _x()
    y_BSD, _ = layer(x_BSD)
    # Reference: the same frozen router, then each token's k experts one by one, weighted by their gates.
    decision = layer.router(x_BSD.reshape(1, -1, D))
    x_SD = x_BSD.reshape(-1, D)
    y_ref_SD = torch.zeros_like(x_SD)
    for e in range(E):
        for k in range(top_k):
            rows = (decision.expert_ids_SK[:, k] == e).nonzero().squeeze(-1)
            if rows.numel():
                out = _ref_moekit_expert(layer.experts, e, x_SD[rows]) * decision.gates_SK[rows, k, None]
                y_ref_SD = y_ref_SD.index_add(0, rows, out)
    _assert_same_grads(y_BSD, y_ref_SD.view_as(y_BSD), {"x": x_BSD, **_adapter_params(layer)})


@pytest.mark.parametrize("config", BANK_CONFIGS, ids=repr)
def test_fixed_rows_bank_equals_reference_loop(config):
    """The expert-choice / Soft MoE path: N rows per expert through ``forward(..., rows_per_expert)`` and
    ``forward_slots``."""
    layer = apply_adapters(_moe(), config, ["experts"])
    _perturb(layer)
    bank, N = layer.experts, 3
    x_END = _x((E, N, D))
    counts_E = torch.full((E,), N)
    y_AD = bank(x_END.reshape(E * N, D), counts_E, rows_per_expert=N)
    y_ref_END = torch.stack([_ref_moekit_expert(bank, e, x_END[e]) for e in range(E)])
    _assert_same_grads(y_AD.view(E, N, D), y_ref_END, {"x": x_END, **_adapter_params(layer)})
    _close(bank.forward_slots(x_END), y_ref_END)
    # The grouped path on the same rows (every expert N rows, one expert with none) agrees too.
    counts_E = torch.tensor([N, 0, 2 * N, N])
    y_AD = bank(x_END.reshape(E * N, D), counts_E)
    starts = [0, N, N, 3 * N]
    y_ref = torch.cat([_ref_moekit_expert(bank, e, x_END.reshape(-1, D)[starts[e]:starts[e] + c])
                       for e, c in enumerate(counts_E.tolist())])
    _close(y_AD, y_ref)


@pytest.mark.parametrize("kind", ["topk", "expert_choice", "soft"])
@pytest.mark.parametrize("config", [LoRAConfig(), IA3Config(), MoLoRAConfig(num_experts=3), MoVConfig(3)], ids=repr)
def test_bank_identity_at_init(config, kind):
    layer = _soft_moe() if kind == "soft" else _moe(router=kind)
    x = _x((2, 8, D))
    y0, _ = layer(x)
    apply_adapters(layer, config, ["experts"])
    y1, _ = layer(x)
    # B = 0 and vectors = 1 leave every product unchanged; the frozen bank runs gate and up as one fused GEMM
    # (experts/fused.py) and the adapted one as two, so the outputs agree to float rounding, not bit for bit.
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["topk", "expert_choice", "soft"])
@pytest.mark.parametrize("config", [LoRAConfig(r=2, alpha=4.0), IA3Config()], ids=repr)
def test_bank_merge_equals_adapted(config, kind):
    layer = _soft_moe() if kind == "soft" else _moe(router=kind)
    apply_adapters(layer, config, ["experts"])
    _perturb(layer)
    x = _x((2, 8, D))
    y_adapted, _ = layer(x)
    merge_adapters(layer)
    assert not list(iter_adapters(layer)) and "forward" not in vars(layer.experts)
    y_merged, _ = layer(x)
    torch.testing.assert_close(y_merged, y_adapted, rtol=1e-4, atol=1e-4)


def test_bank_sites_by_projection_and_kind():
    layer = apply_adapters(_moe(), LoRAConfig(), ["experts.w_out"])
    assert adapter_sites(layer) == {"experts.w_out": "lora"}
    layer = apply_adapters(_moe(), LoRAConfig(), ["experts"])
    assert adapter_sites(layer) == dict.fromkeys(["experts.w_in", "experts.w_gate", "experts.w_out"], "lora")
    # (IA)3 on a bank named as a whole rescales its hidden activation, the input of w_out.
    assert adapter_sites(apply_adapters(_moe(), IA3Config(), ["experts"])) == {"experts.w_out": "scale_input"}
    layer = apply_adapters(_moe(), IA3Config(), {"scale_output": ["experts.w_in"]})
    assert adapter_sites(layer) == {"experts.w_in": "scale_output"}
    _perturb(layer)
    x = _x((1, 6, D))
    y, _ = layer(x)
    merge_adapters(layer)
    torch.testing.assert_close(layer(x)[0], y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# transformers fused experts.
# ---------------------------------------------------------------------------------------------------------------


def _hf_experts(family: str, seed: int = 0):
    import transformers

    cfg = tiny_moe_config(family)
    cls = {"qwen3_moe": transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts,
           "mixtral": transformers.models.mixtral.modeling_mixtral.MixtralExperts,
           "qwen2_moe": transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts,
           "olmoe": transformers.models.olmoe.modeling_olmoe.OlmoeExperts}[family]
    torch.manual_seed(seed)
    experts = cls(cfg)
    with torch.no_grad():  # the weights are torch.empty until a model initialises them
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    return experts


def _hf_routing(S: int, K: int = 2, seed: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids_SK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(S)])
    weights_SK = torch.softmax(torch.randn(S, K, generator=g), -1).requires_grad_(True)
    return ids_SK, weights_SK


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("config", [LoRAConfig(r=4, alpha=8.0), IA3Config(), BANK_CONFIGS[3], BANK_CONFIGS[4]],
                         ids=repr)
def test_hf_fused_experts_equal_reference_loop(family, config):
    experts = _hf_experts(family)
    x_SD = _x((9, 32))
    ids_SK, weights_SK = _hf_routing(9)
    y0_SD = experts(x_SD, ids_SK, weights_SK)  # a standalone module runs transformers' eager loop
    apply_adapters(experts, config, ["gate_up_proj", "down_proj"] if config.kind in ("lora", "molora")
                   else {"scale_input": ["down_proj"]})
    torch.testing.assert_close(experts(x_SD, ids_SK, weights_SK), y0_SD, rtol=1e-6, atol=1e-6)
    _perturb(experts)
    y_SD = experts(x_SD, ids_SK, weights_SK)
    y_ref_SD = torch.zeros_like(x_SD)
    for s in range(9):
        for k in range(2):
            e = int(ids_SK[s, k])
            y_ref_SD = y_ref_SD + F.pad(weights_SK[s, k] * _ref_hf_expert(experts, e, x_SD[s:s + 1]),
                                        (0, 0, s, 8 - s))
    _assert_same_grads(y_SD, y_ref_SD, {"x": x_SD, "routing weights": weights_SK, **_adapter_params(experts)})


def test_hf_block_equals_reference_loop():
    """A whole Qwen3-MoE sparse block (router + adapted experts) against the router plus the reference loop."""
    import transformers

    model = tiny_moe_lm("qwen3_moe")
    block = model.model.layers[0].mlp
    assert isinstance(block, transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock)
    apply_adapters(model, LoRAConfig(r=4, alpha=8.0), ["experts"])
    _perturb(model)
    x_BSD = _x((2, 5, 32))
    y_BSD = block(x_BSD)
    _, weights_SK, ids_SK = block.gate(x_BSD.reshape(-1, 32))
    x_SD = x_BSD.reshape(-1, 32)
    rows = [sum(weights_SK[s, k] * _ref_hf_expert(block.experts, int(ids_SK[s, k]), x_SD[s:s + 1])
                for k in range(ids_SK.shape[1])) for s in range(x_SD.shape[0])]
    _assert_same_grads(y_BSD, torch.cat(rows).view_as(y_BSD), {"x": x_BSD, **_adapter_params(model)})


# (family, (IA)3/MoV sites, LoRA/MoLoRA sites) of one decoder layer: attention k, v (+ the experts' hidden activation
# + Qwen2-MoE's shared expert); q, k, v, o + gate_up, down (+ the shared expert's three projections).
HF_SITES = {"qwen3_moe": (3, 6), "mixtral": (3, 6), "qwen2_moe": (4, 9), "olmoe": (3, 6)}


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("config", [LoRAConfig(), MoVConfig(num_experts=2), MoLoRAConfig(num_experts=2, r=2)],
                         ids=repr)
def test_hf_moe_family_defaults_identity_at_init(family, config):
    model = tiny_moe_lm(family)
    ids_BS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    y0 = model(ids_BS).logits
    apply_adapters(model, config)  # the family's default sites
    n_scale, n_lora = HF_SITES[family]
    sites = adapter_sites(model)
    assert len(sites) == (n_scale if config.kind == "mov" else n_lora)
    assert any(".mlp.experts." in s for s in sites)
    assert torch.equal(model(ids_BS).logits, y0)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("config", [LoRAConfig(r=2, alpha=4.0), IA3Config()], ids=repr)
def test_hf_merge_equals_adapted(family, config):
    model = tiny_moe_lm(family)
    apply_adapters(model, config)
    _perturb(model)
    ids_BS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    y = model(ids_BS).logits
    merge_adapters(model)
    experts = model.model.layers[0].mlp.experts
    assert "forward" not in vars(experts) and not hasattr(experts, "moekit_adapter")
    torch.testing.assert_close(model(ids_BS).logits, y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Save / load, recording, errors.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["moekit", "hf"])
@pytest.mark.parametrize("config", [LoRAConfig(), MoVConfig(num_experts=2)], ids=repr)
def test_bank_save_load_round_trip(which, config, tmp_path):
    def build():
        return _moe() if which == "moekit" else tiny_moe_lm("qwen3_moe")

    def run(model):
        if which == "moekit":
            return model(_x((2, 6, D)))[0]
        return model(torch.arange(3, 15).view(2, 6)).logits

    targets = ["experts"] if which == "moekit" else None
    model = apply_adapters(build(), config, targets)
    _perturb(model)
    y = run(model)
    save_adapters(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    fresh = load_adapters(build(), tmp_path / "ad")
    assert adapter_sites(fresh) == adapter_sites(model)
    assert torch.equal(run(fresh), y)


def test_record_router_probs_on_bank_sites():
    layer = apply_adapters(_moe(), MoVConfig(num_experts=3), ["experts"])
    with record_router_probs(layer) as rec:
        layer(_x((2, 5, D)))
    means = rec.mean()
    assert set(means) == {"experts.w_out"}
    assert means["experts.w_out"].shape == (3,) and abs(float(means["experts.w_out"].sum()) - 1) < 1e-5
    assert rec.counts["experts.w_out"] == 2 * 5 * 2  # every routed row: 10 tokens, top-2


def test_bank_errors():
    with pytest.raises(MoekitError, match="router_input='sentence' cannot route on expert bank 'experts'"):
        apply_adapters(_moe(), MoVConfig(num_experts=2, router_input="sentence"), ["experts"])
    layer = apply_adapters(_moe(), MoLoRAConfig(num_experts=2), ["experts"])
    with pytest.raises(MoekitError, match="cannot merge MoLoRA adapters .*experts"):
        merge_adapters(layer)
    layer = apply_adapters(_moe(), MoVConfig(num_experts=2), ["experts"])
    with pytest.raises(MoekitError, match="cannot merge MoV adapters"):
        merge_adapters(layer)


def test_moekit_lm_targets_and_attention_hint():
    from moekit.models.config import LMConfig
    from moekit.models.lm import TransformerLM

    moe = MoEConfig(d_model=D, d_ff=FF, num_experts=E, top_k=2, capacity_factor=None, activation="swiglu")
    model = TransformerLM(LMConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                                   activation="swiglu", moe=moe))
    with pytest.raises(MoekitError, match=r"pass target_modules.*'ffn\.experts'"):
        apply_adapters(model, LoRAConfig())
    with pytest.raises(MoekitError, match=r"'blocks\.0\.attn\.w_qkv' is a raw parameter of a CausalSelfAttention"):
        apply_adapters(model, LoRAConfig(), ["w_qkv"])
    apply_adapters(model, LoRAConfig(), ["experts"])
    assert sorted(adapter_sites(model)) == [f"blocks.1.ffn.experts.{p}" for p in ("w_gate", "w_in", "w_out")]


def test_bank_adapters_survive_deepcopy_and_merge_on_the_copy():
    import copy

    layer = apply_adapters(_moe(), IA3Config(), ["experts"])
    _perturb(layer)
    twin = copy.deepcopy(layer)
    assert twin.experts.forward.__self__ is twin.experts  # the instance forward is rebound to the copy
    x = _x((1, 6, D))
    y = layer(x)[0]
    torch.testing.assert_close(twin(x)[0], y, rtol=0, atol=0)
    merge_adapters(twin)
    torch.testing.assert_close(twin(x)[0], y, rtol=1e-5, atol=1e-5)
    assert list(iter_adapters(layer))  # the original keeps its adapters
    assert torch.equal(layer(x)[0], y)
