"""moekit's ``MoE`` layer equals Hugging Face transformers' MoE blocks on the same weights.

Each test builds a tiny transformers block from a config (float32, eval mode, random O(0.1-1) weights so that the
routing is far from uniform), copies its weights into a moekit ``MoE`` with the matching config, and checks that
both give the same output on the same ``[2, 7, D]`` input (relative 1e-5) and, backpropagating one fixed random
cotangent, the same gradients w.r.t. the input, the router weight and every expert weight.

Peers: ``MixtralSparseMoeBlock`` (softmax, top-2, renormalised), ``Qwen2MoeSparseMoeBlock`` (softmax top-k with and
without ``norm_topk_prob``, a shared expert behind a sigmoid gate), ``Qwen3MoeSparseMoeBlock`` (renormalised),
``OlmoeSparseMoeBlock`` (not renormalised) and ``DeepseekV3MoE`` (sigmoid scores, ``e_score_correction_bias`` for
choosing only, node-limited groups, ``routed_scaling_factor``, shared experts).

transformers 5.x runs its fused expert tensors through a pluggable "experts implementation" read from
``config._experts_implementation``: the block's own per-expert loop ("eager", what a standalone block runs), and
"grouped_mm" (the default a model picks when it can) and "batched_mm". Every peer is checked under all three.

Weight layouts (transformers 5.x):
- router ``gate.weight`` ``[E, D]``, logits ``x @ W^T``: the same layout and math as moekit's ``router.weight``.
- experts ``gate_up_proj`` ``[E, 2F, D]`` and ``down_proj`` ``[E, D, F]``, used as ``F.linear(x, W[e])`` (``x @
  W[e]^T``); ``linear(x, gate_up_proj[e]).chunk(2)`` makes the FIRST F rows the gate (through SiLU) and the LAST F the
  up projection. moekit multiplies ``x @ w[e]`` with ``w_gate``, ``w_in`` ``[E, D, F]`` and ``w_out`` ``[E, F, D]``.
- shared experts: plain ``nn.Linear`` ``gate_proj``, ``up_proj`` ``[H, D]`` and ``down_proj`` ``[D, H]``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from moekit import MoE, MoEConfig

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

IMPLS = ("eager", "grouped_mm", "batched_mm")
RTOL, ATOL = 1e-5, 1e-6  # float32; every comparison below is relative 1e-5 (ATOL only guards values near 0)
BATCH, SEQ = 2, 7


# ---------------------------------------------------------------------------------------------------------------
# HF tensor -> moekit tensor. The same maps apply to gradients (they are slices and transposes: linear).
# ---------------------------------------------------------------------------------------------------------------


def _dense_ffn(gate_HD: Tensor, up_HD: Tensor, down_DH: Tensor) -> dict[str, Tensor]:
    """One HF gated MLP (``down(silu(gate(x)) * up(x))`` with ``nn.Linear`` weights ``[out, in]``) -> moekit's
    ``DenseFFN`` ``w_out(silu(x @ w_gate) * (x @ w_in))`` with ``[in, out]`` weights: transpose each."""
    return {
        "shared_experts.w_gate": gate_HD.T,  # [H, D] -> [D, H]
        "shared_experts.w_in": up_HD.T,  # HF "up" is moekit's ungated input projection
        "shared_experts.w_out": down_DH.T,  # [D, H] -> [H, D]
    }


def _to_moekit(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF block tensors (its ``named_parameters()`` names) -> moekit ``MoE`` tensors (``get_parameter`` names).

    Raises on any HF tensor it does not know, so no weight of a peer is silently left out of the comparison.
    """
    hf = dict(hf)
    out = {"router.weight": hf.pop("gate.weight")}  # [E, D] both sides, logits = x @ W^T both sides
    gate_up_E2FD, down_EDF = hf.pop("experts.gate_up_proj"), hf.pop("experts.down_proj")
    F = down_EDF.shape[-1]
    # linear(x, gate_up[e]) = x @ gate_up[e]^T; chunk(2) on the output: first F columns gate, last F up.
    out["experts.w_gate"] = gate_up_E2FD[:, :F].transpose(1, 2)  # [E, F, D] -> [E, D, F]
    out["experts.w_in"] = gate_up_E2FD[:, F:].transpose(1, 2)  # [E, F, D] -> [E, D, F]
    out["experts.w_out"] = down_EDF.transpose(1, 2)  # linear(h, down[e]) = h @ down[e]^T: [E, D, F] -> [E, F, D]
    for prefix in ("shared_expert", "shared_experts"):  # Qwen2-MoE's single one / DeepSeek's fused n_shared_experts
        if f"{prefix}.gate_proj.weight" in hf:
            out.update(_dense_ffn(*(hf.pop(f"{prefix}.{p}_proj.weight") for p in ("gate", "up", "down"))))
    if "shared_expert_gate.weight" in hf:
        out["shared_expert_gate.weight"] = hf.pop("shared_expert_gate.weight")  # nn.Linear(D, 1) both sides
    assert not hf, f"HF tensors without a moekit counterpart: {sorted(hf)}"
    return out


def _copy_weights(layer: MoE, block: torch.nn.Module) -> MoE:
    with torch.no_grad():
        for name, t in _to_moekit(dict(block.named_parameters())).items():
            p = layer.get_parameter(name)
            assert p.shape == t.shape, (name, p.shape, t.shape)
            p.copy_(t)
    return layer.eval()


def _moe_config(d_model: int, d_ff: int, num_experts: int, top_k: int, **kw) -> MoEConfig:
    # Dropless (HF blocks never drop), SwiGLU experts, no jitter: the exact peers of HF's eval-mode blocks.
    return MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, capacity_factor=None,
                     activation="swiglu", jitter_eps=0.0, **kw)


# ---------------------------------------------------------------------------------------------------------------
# One loader per family: the HF config -> MoEConfig, then the weights.
# ---------------------------------------------------------------------------------------------------------------


def _load_mixtral(block: MixtralSparseMoeBlock) -> MoE:
    c = block.experts.config
    # MixtralTopKRouter always divides the top-k softmax probabilities by their sum.
    cfg = _moe_config(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok,
                      normalize_gates=True)
    return _copy_weights(MoE(cfg), block)


def _load_qwen2(block: Qwen2MoeSparseMoeBlock) -> MoE:
    c = block.experts.config
    # One shared expert of width shared_expert_intermediate_size, scaled by sigmoid(shared_expert_gate(x)).
    cfg = _moe_config(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                      normalize_gates=c.norm_topk_prob, num_shared_experts=1,
                      shared_d_ff=c.shared_expert_intermediate_size, shared_expert_gate=True)
    return _copy_weights(MoE(cfg), block)


def _load_qwen3(block: Qwen3MoeSparseMoeBlock) -> MoE:
    c = block.experts.config
    cfg = _moe_config(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                      normalize_gates=c.norm_topk_prob)
    return _copy_weights(MoE(cfg), block)


def _load_olmoe(block: OlmoeSparseMoeBlock) -> MoE:
    c = block.experts.config
    cfg = _moe_config(c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok,
                      normalize_gates=c.norm_topk_prob)
    return _copy_weights(MoE(cfg), block)


def _load_deepseek(block: DeepseekV3MoE) -> MoE:
    c = block.config
    # DeepSeek-V3: sigmoid scores, choose by scores + e_score_correction_bias among the topk_group best of n_group
    # groups (a group scored by its two best biased scores), gate by the unbiased scores renormalised, times
    # routed_scaling_factor; n_shared_experts shared experts run as one MLP of width n_shared * moe_intermediate_size.
    cfg = _moe_config(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok,
                      score_func="sigmoid", normalize_gates=c.norm_topk_prob,
                      routed_scaling_factor=c.routed_scaling_factor, expert_bias=True,
                      num_expert_groups=c.n_group, topk_groups=c.topk_group,
                      num_shared_experts=c.n_shared_experts, shared_d_ff=c.moe_intermediate_size)
    layer = _copy_weights(MoE(cfg), block)
    with torch.no_grad():
        layer.router.expert_bias.copy_(block.gate.e_score_correction_bias)  # float32 [E] buffer both sides
    return layer


# ---------------------------------------------------------------------------------------------------------------
# Building, randomising and comparing.
# ---------------------------------------------------------------------------------------------------------------


def _build(block_cls, config, impl: str, seed: int, *, router_scale: float = 0.5, weight_scale: float = 0.2):
    """The HF block in float32 eval mode with weights ~ N(0, scale^2): routers at 0.5 (logits of std ~2-3 for
    D = 16-32, a peaked but not one-hot softmax), experts at 0.2 (outputs O(1))."""
    config._experts_implementation = impl  # read by the @use_experts_implementation experts at every forward
    block = block_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = router_scale if name == "gate.weight" else weight_scale
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return block


def _hf_forward(block: torch.nn.Module, x: Tensor) -> Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out  # some versions / blocks return (y, router_logits)


def _hf_choices(block: torch.nn.Module, x: Tensor) -> Tensor:
    """The experts HF's router picks for each token, sorted (DeepSeek's topk is unsorted)."""
    _, _, ids_SK = block.gate(x.reshape(-1, x.shape[-1]))
    return ids_SK.sort(dim=-1).values


def _moekit_choices(layer: MoE, x: Tensor) -> Tensor:
    return layer.router(x.reshape(-1, x.shape[-1])).expert_ids_SK.sort(dim=-1).values


def _assert_matches(block: torch.nn.Module, layer: MoE, seed: int) -> dict[str, float]:
    """Same output, and same gradients w.r.t. x and every weight. Returns the max abs errors."""
    gen = torch.Generator().manual_seed(seed + 1000)
    D = layer.config.d_model
    x = torch.randn(BATCH, SEQ, D, generator=gen)
    x_hf, x_mk = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = _hf_forward(block, x_hf)
    y_mk, _ = layer(x_mk)
    assert y_mk.shape == y_hf.shape == x.shape
    assert y_hf.abs().max() > 0.1  # a real output, not a degenerate near-zero one
    with torch.no_grad():  # non-degenerate routing: the 14 tokens spread over at least half the experts
        assert _moekit_choices(layer, x).unique().numel() >= layer.num_experts // 2
    torch.testing.assert_close(y_mk, y_hf, rtol=RTOL, atol=ATOL)
    errors = {"y": (y_mk - y_hf).abs().max().item()}

    g = torch.randn(y_hf.shape, generator=gen)  # one fixed cotangent for both
    hf_params = dict(block.named_parameters())
    hf_grads = torch.autograd.grad((y_hf * g).sum(), [x_hf, *hf_params.values()], allow_unused=True,
                                   materialize_grads=True)
    want = {"x": hf_grads[0], **_to_moekit(dict(zip(hf_params, hf_grads[1:], strict=True)))}
    mk_params = [layer.get_parameter(name) for name in want if name != "x"]
    got = dict(zip(want, torch.autograd.grad((y_mk * g).sum(), [x_mk, *mk_params]), strict=True))
    for name, ref in want.items():
        scale = ref.abs().max().item()
        assert scale > 0, name  # every compared gradient is a real one
        # Gradients reach O(10) (sums over tokens); the absolute floor scales with the tensor's largest entry so that
        # its near-zero entries are held to the same relative 1e-5 as the rest, not to float32 noise.
        torch.testing.assert_close(got[name], ref, rtol=RTOL, atol=ATOL * max(1.0, scale),
                                   msg=lambda m, n=name: f"grad {n}: {m}")
        errors[f"d{name}"] = (got[name] - ref).abs().max().item()
    return errors


# ---------------------------------------------------------------------------------------------------------------
# The peers.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_mixtral(impl):
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    block = _build(MixtralSparseMoeBlock, cfg, impl, seed=1)
    _assert_matches(block, _load_mixtral(block), seed=1)


@pytest.mark.parametrize("norm_topk_prob", [False, True], ids=["raw_gates", "renormalised"])
@pytest.mark.parametrize("impl", IMPLS)
def test_qwen2_moe(impl, norm_topk_prob):
    cfg = transformers.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    block = _build(Qwen2MoeSparseMoeBlock, cfg, impl, seed=2)
    layer = _load_qwen2(block)
    _assert_matches(block, layer, seed=2)
    # The shared expert and its gate really contribute: without them the outputs differ.
    x = torch.randn(BATCH, SEQ, 32)
    with torch.no_grad():
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    assert shared.abs().max() > 0.1


@pytest.mark.parametrize("impl", IMPLS)
def test_qwen3_moe(impl):
    cfg = transformers.Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=16, num_experts=16, num_experts_per_tok=4,
                                      norm_topk_prob=True)
    block = _build(Qwen3MoeSparseMoeBlock, cfg, impl, seed=3)
    _assert_matches(block, _load_qwen3(block), seed=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_olmoe(impl):
    cfg = transformers.OlmoeConfig(hidden_size=16, intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                   norm_topk_prob=False)
    block = _build(OlmoeSparseMoeBlock, cfg, impl, seed=4)
    _assert_matches(block, _load_olmoe(block), seed=4)


def _deepseek_block(impl: str, seed: int, bias_scale: float) -> DeepseekV3MoE:
    cfg = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                                        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
                                        norm_topk_prob=True, routed_scaling_factor=2.5)
    block = _build(DeepseekV3MoE, cfg, impl, seed=seed)
    gen = torch.Generator().manual_seed(seed + 500)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * bias_scale)
    return block


def _deepseek_choices_without(block: DeepseekV3MoE, x: Tensor, *, bias: bool = True, groups: bool = True) -> Tensor:
    """HF's choices with the correction bias zeroed and/or the group limit lifted (topk_group = n_group)."""
    saved_bias, saved_groups = block.gate.e_score_correction_bias.clone(), block.gate.topk_group
    try:
        with torch.no_grad():
            if not bias:
                block.gate.e_score_correction_bias.zero_()
        if not groups:
            block.gate.topk_group = block.gate.num_group
        return _hf_choices(block, x)
    finally:
        with torch.no_grad():
            block.gate.e_score_correction_bias.copy_(saved_bias)
        block.gate.topk_group = saved_groups


@pytest.mark.parametrize("impl", IMPLS)
def test_deepseek_v3(impl):
    block = _deepseek_block(impl, seed=5, bias_scale=0.02)
    layer = _load_deepseek(block)
    _assert_matches(block, layer, seed=5)
    x = torch.randn(BATCH, SEQ, 32)
    with torch.no_grad():
        chosen = _hf_choices(block, x)
        assert torch.equal(_moekit_choices(layer, x), chosen)
        # The group limit matters here: some tokens would pick experts outside their two best groups without it.
        assert (_deepseek_choices_without(block, x, groups=False) != chosen).any(dim=-1).sum() >= 3


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_deepseek_v3_bias_changes_the_choice(impl):
    """A correction bias large next to the sigmoid scores: it moves many tokens' choices. moekit must choose by
    ``scores + bias`` (as HF does) yet gate by the plain scores, so a bias ignored for choosing, or added to the gates,
    breaks the match."""
    block = _deepseek_block(impl, seed=6, bias_scale=0.5)
    layer = _load_deepseek(block)
    x = torch.randn(BATCH, SEQ, 32)
    with torch.no_grad():
        chosen = _hf_choices(block, x)
        unbiased = _deepseek_choices_without(block, x, bias=False)
        changed = (chosen != unbiased).any(dim=-1)
        assert changed.sum() >= BATCH * SEQ // 2  # the bias changes at least half the tokens' expert sets
        assert torch.equal(_moekit_choices(layer, x), chosen)
        # The gates are the chosen experts' UNBIASED scores, renormalised, times routed_scaling_factor.
        decision = layer.router(x.reshape(-1, 32))
        _, hf_gates_SK, hf_ids_SK = block.gate(x.reshape(-1, 32))
        order = decision.expert_ids_SK.argsort(dim=-1)
        hf_order = hf_ids_SK.argsort(dim=-1)
        torch.testing.assert_close(decision.gates_SK.gather(-1, order), hf_gates_SK.gather(-1, hf_order),
                                   rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(decision.gates_SK.sum(-1), torch.full((BATCH * SEQ,), 2.5), rtol=RTOL, atol=ATOL)
    _assert_matches(block, layer, seed=6)
