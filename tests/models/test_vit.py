"""ViT: every FFN type learns the digits, Soft MoE has no batch effect while capacity-limited token choice does,
parameter and FLOP counts (golden, against a built model and against torch's FLOP counter), the FLOP-matched
dense model, the loss formula, the patch layout, and refusals of bad configs and inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moekit import MoEConfig, SoftMoEConfig
from moekit.data.images import ImageBatches
from moekit.lab.data.images import load_digits_split
from moekit.layers.moe import MoE
from moekit.layers.soft_moe import SoftMoE
from moekit.models import ViT, ViTConfig, vit_flop_matched_dense, vit_flops_per_image, vit_parameter_counts
from moekit.models.vit import patchify

D = 16


def _cfg(moe=None, **kw) -> ViTConfig:
    base = dict(image_size=8, patch_size=2, d_model=D, n_layers=2, n_heads=2, d_ff=32, moe=moe)
    base.update(kw)
    return ViTConfig(**base)


def _numel(config: ViTConfig) -> int:
    return sum(p.numel() for p in ViT(config).parameters())


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


# --- learning ---------------------------------------------------------------------------------------------------

FFNS = {
    "dense": None,
    "top1_cf1": MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=1, capacity_factor=1.0),
    "top2_cf1.25_bpr": MoEConfig(
        d_model=32, d_ff=64, num_experts=4, top_k=2, capacity_factor=1.25, batch_priority=True
    ),
    "expert_choice_c1": MoEConfig(d_model=32, d_ff=64, num_experts=4, router="expert_choice", capacity_factor=1.0),
    "soft_p1": SoftMoEConfig(d_model=32, d_ff=64, num_experts=4, slots_per_expert=1),
    "soft_p2": SoftMoEConfig(d_model=32, d_ff=64, num_experts=4, slots_per_expert=2),
}


@pytest.mark.parametrize("kind", list(FFNS))
def test_every_ffn_type_learns_digits_and_every_parameter_gets_a_gradient(kind, digits):
    c = _cfg(FFNS[kind], d_model=32, d_ff=64)
    model = ViT(c)
    batches = ImageBatches(digits.train_images[:512], digits.train_labels[:512], batch_size=64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(50):
        images, labels = batches.next_batch()
        out = model(images, labels)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert no_grad == [], f"parameters without gradient: {no_grad}"
            assert len(out.aux) == (0 if kind == "dense" else 1)  # the default: MoE in the last half (block 1)
        opt.step()
        losses.append(float(out.loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first == pytest.approx(2.30, abs=0.05)  # ln(10): the small head starts near uniform
    assert last < 0.7 * first, (kind, first, last)


# --- batch effects ----------------------------------------------------------------------------------------------


def test_soft_moe_image_logits_do_not_depend_on_the_rest_of_the_batch(digits):
    c = _cfg(SoftMoEConfig(d_model=D, d_ff=32, num_experts=4, slots_per_expert=2), n_layers=3, moe_blocks=[1, 2])
    model = ViT(c).eval()
    images = torch.from_numpy(digits.test_images[:9])
    alone = model(images[:1]).logits_BC
    with_others = model(images).logits_BC[:1]
    other_batch = model(torch.cat([images[1:5].flip(0), images[:1], images[5:]])).logits_BC[4:5]
    torch.testing.assert_close(with_others, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(other_batch, alone, atol=1e-5, rtol=0)


def test_token_choice_capacity_makes_an_image_depend_on_its_batch(digits):
    # Top-1, capacity factor 1.0, no minimum capacity: the batch is ONE routing group, so slots go to tokens in
    # batch order, and an expert that the first images overload has no room left for the last image's tokens.
    # Switch init scale 1.0 (not 0.1) so the expert outputs, and so the drops, move the logits visibly.
    moe = MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=0, init_scale=1.0)
    model = ViT(_cfg(moe, init_scale=1.0)).eval()
    images = torch.from_numpy(digits.test_images[:8])
    target = images[7:8]
    alone = model(target)
    in_batch = model(images)
    assert (in_batch.logits_BC[7:] - alone.logits_BC).abs().max() > 1e-3  # logits are ~0.1 in size
    # The documented cause: tokens were dropped for capacity; dropless routing removes the effect.
    assert float(in_batch.aux[0].drop_fraction) > 0.1
    dropless = ViT(_cfg(dataclasses.replace(moe, capacity_factor=None), init_scale=1.0))
    dropless.load_state_dict(model.state_dict())
    dropless.eval()
    assert (dropless(images).logits_BC[7:] - dropless(target).logits_BC).abs().max() < 1e-6


# --- counts -----------------------------------------------------------------------------------------------------


def test_parameter_counts_golden_and_match_numel():
    c = _cfg(MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=1))
    # 16 patches of 2x2x1 = 4 values. patch projection 4*16 + 16 = 80; positions 16*16 = 256; final LayerNorm 32;
    # head 16*10 + 10 = 170; per block: attention 4*16*16 = 1024 + two LayerNorms 64 = 1088, x2 = 2176.
    # block 0 dense FFN 2*16*32 = 1024; block 1 (the last half) MoE: 4 experts * 1024 + router 4*16 = 4160.
    # total = 80 + 256 + 32 + 170 + 2176 + 1024 + 4160 = 7898; active = 7898 - 3 * 1024 = 4826.
    assert vit_parameter_counts(c) == {"total": 7898, "active": 4826, "expert": 4096}
    assert _numel(c) == 7898
    soft = _cfg(SoftMoEConfig(d_model=D, d_ff=32, num_experts=4, slots_per_expert=4))
    # router phi 16*4*4 = 256 + scale 1; E*P = 16 slots for N = 16 tokens: one expert pass per token on average.
    assert vit_parameter_counts(soft) == {"total": 8091, "active": 8091 - 3 * 1024, "expert": 4096}
    variants = [
        _cfg(),
        _cfg(pool="cls"),
        _cfg(activation="swiglu", moe=MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=2, activation="swiglu")),
        _cfg(MoEConfig(d_model=D, d_ff=24, num_experts=3, noisy_gating=True), n_layers=4, moe_blocks=[0, 3]),
        _cfg(MoEConfig(d_model=D, d_ff=32, num_experts=4, router="expert_choice", capacity_factor=2.0)),
        _cfg(SoftMoEConfig(d_model=D, d_ff=32, num_experts=2, slots_per_expert=3), pool="cls", in_channels=3),
        _cfg(dense_d_ff_at_moe=64, n_layers=3),
        vit_flop_matched_dense(_cfg(MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=2))),
    ]
    for v in variants:
        assert _numel(v) == vit_parameter_counts(v)["total"], v


def test_flops_golden():
    c = _cfg(MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=1))
    # N = 16 tokens, D = 16. patch projection 2*16*4*16 = 2048; head 2*16*10 = 320;
    # per layer attention projections 2*16*4*16*16 = 32768 + scores 2*2*16*16*16 = 16384 -> 49152, x2 = 98304;
    # block 0 dense FFN 2*16*1024 = 32768; block 1 router 2*16*4*16 = 2048 + one expert per token 2*16*1024 = 32768.
    # forward = 2048 + 320 + 98304 + 32768 + 2048 + 32768 = 168256; train = 3x.
    assert vit_flops_per_image(c) == {"forward": 168256, "train": 504768}
    soft = _cfg(SoftMoEConfig(d_model=D, d_ff=32, num_experts=4, slots_per_expert=4))
    # Soft MoE block, E*P = 16 slots: logits 2*16*16*16 = 8192, dispatch + combine 2*2*16*16*16 = 16384,
    # 16 expert passes 2*16*1024 = 32768 -> 57344 in place of 34816.
    assert vit_flops_per_image(soft)["forward"] == 168256 - 34816 + 57344


@pytest.mark.parametrize(
    "moe",
    [None, SoftMoEConfig(d_model=D, d_ff=32, num_experts=4, slots_per_expert=4), SoftMoEConfig(D, 32, 3, 2)],
)
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_flops_match_torch_flop_counter(moe, pool):
    # torch counts every matmul and einsum the model runs (but not the CPU attention kernel, added analytically).
    c = _cfg(moe, pool=pool)
    model = ViT(c)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(3, 1, 8, 8))
    attention_scores = c.n_layers * 2 * 2 * c.num_tokens**2 * c.d_model
    assert counter.get_total_flops() / 3 + attention_scores == vit_flops_per_image(c)["forward"]


def test_flop_matched_dense_has_the_same_flops_up_to_routing():
    N = 16
    cases = [
        (MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=1), 32, 2 * N * 4 * D),
        (MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=2), 64, 2 * N * 4 * D),
        (MoEConfig(d_model=D, d_ff=32, num_experts=4, router="expert_choice", capacity_factor=2.0), 64, 2 * N * 4 * D),
        # E * P = 16 slots = N tokens: the dense FFN with the experts' d_ff; routing = logits + dispatch + combine.
        (SoftMoEConfig(d_model=D, d_ff=32, num_experts=4, slots_per_expert=4), 32, 3 * 2 * N * 16 * D),
        (SoftMoEConfig(d_model=D, d_ff=32, num_experts=4, slots_per_expert=2), 16, 3 * 2 * N * 8 * D),
    ]
    for moe, width, routing in cases:
        c = _cfg(moe, n_layers=4)
        d = vit_flop_matched_dense(c)
        assert d.moe is None and d.moe_blocks == [2, 3]
        assert [d.dense_d_ff(i) for i in range(4)] == [32, 32, width, width]
        # two MoE blocks (the last half of 4), each with its routing FLOPs
        assert vit_flops_per_image(c)["forward"] - 2 * routing == vit_flops_per_image(d)["forward"], moe
        assert _numel(d) == vit_parameter_counts(d)["total"]
    with pytest.raises(ValueError, match="not a positive integer"):
        vit_flop_matched_dense(_cfg(SoftMoEConfig(d_model=D, d_ff=30, num_experts=3)))  # 3 * 30 / 16 tokens


# --- model behaviour --------------------------------------------------------------------------------------------


def test_loss_is_ce_plus_weighted_mean_aux_losses_and_correct_counts_hits(digits):
    moe = MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=2, capacity_factor=1.25)
    c = _cfg(moe, n_layers=4, moe_blocks=[1, 3], load_balance_coef=0.5, z_loss_coef=0.25)
    model = ViT(c)
    images = torch.from_numpy(digits.train_images[:12])
    labels = torch.from_numpy(digits.train_labels[:12])
    out = model(images, labels)
    assert len(out.aux) == 2
    lb = (out.aux[0].load_balancing_loss + out.aux[1].load_balancing_loss) / 2
    z = (out.aux[0].z_loss + out.aux[1].z_loss) / 2
    ce = F.cross_entropy(out.logits_BC, labels)
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.5 * lb + 0.25 * z)
    assert float(lb.detach()) > 0.9 and float(z.detach()) > 0  # L_B is 1.0 at perfect balance
    assert out.correct.dtype == torch.int64 and out.correct.dim() == 0
    assert int(out.correct) == int((out.logits_BC.argmax(-1) == labels).sum())
    rigged = out.logits_BC.argmax(-1).clone()
    rigged[:5] = (rigged[:5] + 1) % 10
    assert int(model(images, rigged).correct) == 7
    dense = ViT(_cfg())(images, labels)
    assert dense.aux == [] and dense.loss.item() == dense.ce_loss.item() and dense.z_loss.item() == 0.0
    soft = ViT(_cfg(SoftMoEConfig(d_model=D, d_ff=32, num_experts=4)))(images, labels)
    assert soft.loss.item() == soft.ce_loss.item()  # Soft MoE has no aux loss


def test_one_expert_dropless_moe_equals_the_dense_vit(digits):
    dense = ViT(_cfg())
    moe = ViT(_cfg(MoEConfig(d_model=D, d_ff=32, num_experts=1, top_k=1, capacity_factor=None)))
    state = dense.state_dict()
    ffn = moe.blocks[1].ffn
    assert isinstance(ffn, MoE)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in state:
                p.copy_(state[name])
        ffn.experts.w_in[0].copy_(dense.blocks[1].ffn.w_in)
        ffn.experts.w_out[0].copy_(dense.blocks[1].ffn.w_out)
    images = torch.from_numpy(digits.test_images[:6])
    torch.testing.assert_close(moe(images).logits_BC, dense(images).logits_BC, atol=1e-6, rtol=1e-5)


def test_patch_projection_equals_a_strided_convolution():
    c = _cfg(image_size=12, patch_size=3, in_channels=3)
    model = ViT(c)
    images = torch.randn(2, 3, 12, 12)
    w = model.patch_embed.weight.view(D, 3, 3, 3)
    conv_BDhw = F.conv2d(images, w, model.patch_embed.bias, stride=3)
    expected_BND = conv_BDhw.flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.patch_embed(patchify(images, 3)), expected_BND, atol=1e-5, rtol=1e-5)


def test_cls_pool_and_default_moe_blocks():
    soft = SoftMoEConfig(d_model=D, d_ff=32, num_experts=4)
    c = _cfg(soft, pool="cls", n_layers=5)
    assert c.num_patches == 16 and c.num_tokens == 17
    assert c.moe_block_indices() == [2, 3, 4]
    model = ViT(c)
    assert [isinstance(b.ffn, SoftMoE) for b in model.blocks] == [False, False, True, True, True]
    assert model.pos_embed.shape == (1, 17, D)
    out = model(torch.randn(4, 8, 8))  # [B, H, W] is accepted when in_channels == 1
    assert out.logits_BC.shape == (4, 10) and len(out.aux) == 3
    assert _cfg(n_layers=1, moe=soft).moe_block_indices() == [0]
    assert _cfg().moe_block_indices() == []


def test_wrong_image_shapes_are_refused():
    model = ViT(_cfg())
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 8, 8\].*got shape \(2, 1, 9, 8\)"):
        model(torch.randn(2, 1, 9, 8))
    with pytest.raises(ValueError, match="got shape"):
        model(torch.randn(2, 64))
    with pytest.raises(ValueError, match="floating point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    rgb = ViT(_cfg(in_channels=3))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 8, 8\], got shape \(2, 8, 8\)"):
        rgb(torch.randn(2, 8, 8))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(patch_size=3), r"model.patch_size must divide model.image_size \(8\), got 3"),
        (dict(n_heads=3), r"model.n_heads must divide model.d_model \(16\), got 3"),
        (dict(d_model=0), "model.d_model must be a positive integer, got 0"),
        (dict(num_classes=1.5), "model.num_classes must be a positive integer, got 1.5"),
        (dict(pool="max"), "model.pool must be one of"),
        (dict(activation="tanh"), "model.activation must be one of"),
        (dict(dropout=1.0), r"model.dropout must be in \[0, 1\), got 1.0"),
        (dict(norm_eps=0), "model.norm_eps must be a number > 0, got 0"),
        (dict(z_loss_coef=-1), "model.z_loss_coef must be a number >= 0, got -1"),
        (dict(moe=MoEConfig(d_model=32, d_ff=32, num_experts=2)), r"moe.d_model \(32\) must equal model.d_model"),
        (dict(moe=SoftMoEConfig(d_model=D, d_ff=32, num_experts=2), moe_blocks=[]), "model.moe_blocks is empty"),
        (dict(moe_blocks=[2]), r"in \[0, n_layers=2\), got 2"),
        (dict(moe_blocks=[1, 1]), "must not repeat a block"),
        (dict(moe_blocks="1"), "must be a list of block indices"),
        (dict(moe=MoEConfig(D, 32, 2), dense_d_ff_at_moe=64), "applies to dense models only"),
        (dict(moe="soft"), "model.moe must be a MoEConfig, a SoftMoEConfig or None"),
    ],
)
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)


def test_non_causal_routers_are_allowed():
    for moe in (
        MoEConfig(D, 32, 4, router="expert_choice", capacity_factor=1.0),
        MoEConfig(D, 32, 4, top_k=2, batch_priority=True),
    ):
        out = ViT(_cfg(moe))(torch.randn(2, 1, 8, 8))
        assert torch.isfinite(out.logits_BC).all()


@pytest.mark.parametrize("moe", [FFNS["top2_cf1.25_bpr"], FFNS["expert_choice_c1"], FFNS["soft_p2"]])
def test_bf16_autocast_keeps_the_losses_in_float32(moe, digits):
    model = ViT(_cfg(moe, d_model=32, d_ff=64, pool="cls"))
    images = torch.from_numpy(digits.train_images[:8])
    labels = torch.from_numpy(digits.train_labels[:8])
    reference = model(images, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, labels)
    assert out.logits_BC.dtype == torch.bfloat16
    assert out.loss.dtype == out.ce_loss.dtype == torch.float32
    assert abs(out.ce_loss.item() - reference.ce_loss.item()) < 0.02  # bf16 has ~3 significant digits
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
