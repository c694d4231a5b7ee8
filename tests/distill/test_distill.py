"""Distillation: the non-expert weights are copied exactly, the FFN initialisations are what they say, and the loss
is the stated 0.75 / 0.25 mix (checked on hand-made logits); for a decoder LM and for an encoder-decoder."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.analysis.trace import iter_windows, trace_model, trace_seq2seq
from moekit.distill import (
    DistilledLM,
    DistilledSeq2Seq,
    copy_non_expert_weights,
    distillation_loss,
    init_seq2seq_student_ffns,
    init_student_ffns,
    seq2seq_student_config,
    student_config,
)
from moekit.distill.student import expert_usage
from moekit.models import TransformerLM
from moekit.models.seq2seq import Seq2SeqLM
from moekit.models.seq2seq_flops import seq2seq_flops_per_token
from tests.analysis.tiny_moe import tiny_moe, tiny_seq2seq


def _usage(teacher: TransformerLM):
    tokens = torch.arange(128) % 50
    return expert_usage(trace_model(teacher, iter_windows(tokens.numpy(), 16, 4, None)))


@pytest.mark.parametrize("top_k", [1, 2])
def test_non_expert_weights_are_copied_exactly(top_k):
    teacher = tiny_moe(top_k=top_k)
    cfg = student_config(teacher.config)
    assert cfg.moe is None and (cfg.dense_d_ff_at_moe or cfg.d_ff) == top_k * 24
    torch.manual_seed(5)
    student = DistilledLM(cfg)
    copied = copy_non_expert_weights(teacher, student)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    expected = {n for n in t_state if not (n.startswith(("blocks.1.ffn.", "blocks.3.ffn.")))}
    assert set(copied) == expected
    assert "embed.weight" in expected and "blocks.0.ffn.w_in" in expected and "blocks.2.attn.w_qkv" in expected
    for name in expected:
        assert torch.equal(s_state[name], t_state[name]), name
    # The student is a plain TransformerLM state dict (the teacher is not a submodule).
    assert set(s_state) == set(TransformerLM(cfg).state_dict())


def test_mean_and_top_initialisations():
    teacher = tiny_moe(top_k=2)
    usage = _usage(teacher)
    student = DistilledLM(student_config(teacher.config))
    done = init_student_ffns(teacher, student, "mean", usage)
    bank, dense = teacher.blocks[1].ffn.experts, student.blocks[1].ffn
    F = 24
    for j in range(2):  # two side-by-side copies of the mean expert, w_out scaled by the mean total gate / k
        torch.testing.assert_close(dense.w_in[:, j * F : (j + 1) * F], bank.w_in.mean(0))
        scale = usage[0]["mean_total_gate"] / 2
        torch.testing.assert_close(dense.w_out[j * F : (j + 1) * F], bank.w_out.mean(0) * scale)
    assert done[0]["method"] == "mean"

    done = init_student_ffns(teacher, student, "top", usage)
    kept = usage[1]["kept_per_expert"]
    top2 = sorted(range(4), key=lambda e: (-kept[e], e))[:2]
    assert done[1]["experts"] == top2
    bank, dense = teacher.blocks[3].ffn.experts, student.blocks[3].ffn
    for j, e in enumerate(top2):
        torch.testing.assert_close(dense.w_in[:, j * F : (j + 1) * F], bank.w_in[e])
        scale = usage[1]["mean_gate_per_expert"][e]
        torch.testing.assert_close(dense.w_out[j * F : (j + 1) * F], bank.w_out[e] * scale)

    before = student.blocks[1].ffn.w_in.clone()
    init_student_ffns(teacher, student, "random")  # leaves the student's own initialisation
    assert torch.equal(student.blocks[1].ffn.w_in, before)
    with pytest.raises(ValueError, match="unknown student initialisation"):
        init_student_ffns(teacher, student, "median", usage)


def test_loss_is_the_stated_mix_on_hand_made_logits():
    # One token, 2-word vocabulary. Student logits (ln 1, ln 3) -> q = (.25, .75); teacher (ln 3, ln 1) ->
    # p = (.75, .25); label 0.
    student = torch.tensor([[[0.0, math.log(3.0)]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])
    targets = torch.tensor([[0]])
    out = distillation_loss(student, teacher, targets)
    # hard = -ln .25 = 1.386294; soft = -(.75 ln .25 + .25 ln .75) = 1.039721 + 0.071921 = 1.111641
    # loss = .75 * 1.386294 + .25 * 1.111641 = 1.039721 + 0.277910 = 1.317631
    assert float(out.hard_ce) == pytest.approx(1.386294, abs=1e-6)
    assert float(out.soft_ce) == pytest.approx(1.111641, abs=1e-6)
    assert float(out.loss) == pytest.approx(1.317631, abs=1e-6)


def test_distilled_lm_trains_on_the_mix_and_evaluates_on_plain_ce():
    teacher = tiny_moe(top_k=1)
    student = DistilledLM(student_config(teacher.config), teacher)
    tokens = torch.randint(0, 50, (2, 16))
    targets = torch.roll(tokens, -1, 1)
    student.train()
    out = student(tokens, targets)
    with torch.no_grad():
        t_logits = teacher(tokens).logits_BTV
    mix = distillation_loss(out.logits_BTV, t_logits, targets)
    torch.testing.assert_close(out.loss, mix.loss)
    torch.testing.assert_close(out.ce_loss, mix.hard_ce)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    assert not teacher.training  # and stays in eval mode while the student trains
    student.eval()
    plain = student(tokens, targets)
    torch.testing.assert_close(plain.loss, plain.ce_loss)
    assert "_teacher" not in dict(student.named_modules())


def test_label_weight_one_is_plain_training():
    teacher = tiny_moe(top_k=1)
    student = DistilledLM(student_config(teacher.config), teacher, hard_weight=1.0)
    tokens = torch.randint(0, 50, (2, 16))
    out = student.train()(tokens, torch.roll(tokens, -1, 1))
    torch.testing.assert_close(out.loss, out.ce_loss)


def _s2s_batches(n: int = 2, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(2, 50, (4, 12), generator=g), torch.randint(2, 50, (4, 6), generator=g)) for _ in range(n)]


def _s2s_usage(teacher: Seq2SeqLM) -> dict:
    return {stack: expert_usage(t) for stack, t in trace_seq2seq(teacher, _s2s_batches()).items()}


def test_seq2seq_student_is_the_flop_matched_dense_model_with_the_teachers_weights():
    teacher = tiny_seq2seq(top_k=2, dense_before_moe=True)
    cfg = seq2seq_student_config(teacher.config)
    assert cfg.encoder_moe is None and cfg.decoder_moe is None
    assert cfg.encoder_dense_d_ff_at_moe == cfg.decoder_dense_d_ff_at_moe == 2 * 24  # top_k x expert d_ff
    torch.manual_seed(5)
    student = DistilledSeq2Seq(cfg)
    copied = copy_non_expert_weights(teacher, student)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    # Block 1 of each stack runs a dense FFN (ff.0, copied) then the MoE (ff.1: router and experts, skipped).
    moe = ("encoder.blocks.1.ff.1.ffn.", "decoder.blocks.1.ff.1.ffn.")
    assert set(copied) == {n for n in t_state if not n.startswith(moe)}
    assert {"embed.weight", "head.weight", "encoder.blocks.1.ff.0.ffn.w_in", "encoder.blocks.1.ff.1.norm.weight",
            "decoder.blocks.0.cross_attn.w_kv", "encoder.blocks.0.self_attn.relative_bias.weight"} <= set(copied)
    for name in copied:
        assert torch.equal(s_state[name], t_state[name]), name
    assert set(s_state) == set(Seq2SeqLM(cfg).state_dict())  # the teacher is not a submodule
    # FLOPs per target token: the teacher's active FLOPs but for its router matmuls (2 E D per token and MoE layer:
    # S input tokens through one encoder MoE layer, T targets through one decoder MoE layer).
    S, T = 12, 6
    t_f, s_f = seq2seq_flops_per_token(teacher.config, S, T), seq2seq_flops_per_token(cfg, S, T)
    assert t_f["forward_per_example"] - s_f["forward_per_example"] == 2 * 4 * 16 * (S + T)


def test_seq2seq_mean_and_top_initialisations():
    teacher = tiny_seq2seq(top_k=2)
    usage = _s2s_usage(teacher)
    student = DistilledSeq2Seq(seq2seq_student_config(teacher.config))
    done = init_seq2seq_student_ffns(teacher, student, "mean", usage)
    assert [(d["stack"], d["block"], d["method"]) for d in done] == [("encoder", 1, "mean"), ("decoder", 1, "mean")]
    F = 24
    for stack in ("encoder", "decoder"):
        bank = getattr(teacher, stack).blocks[1].ff[0].ffn.experts
        dense = getattr(student, stack).blocks[1].ff[0].ffn
        scale = usage[stack][0]["mean_total_gate"] / 2
        for j in range(2):
            torch.testing.assert_close(dense.w_in[:, j * F : (j + 1) * F], bank.w_in.mean(0))
            torch.testing.assert_close(dense.w_gate[:, j * F : (j + 1) * F], bank.w_gate.mean(0))
            torch.testing.assert_close(dense.w_out[j * F : (j + 1) * F], bank.w_out.mean(0) * scale)
    done = init_seq2seq_student_ffns(teacher, student, "top", usage)
    kept = usage["decoder"][0]["kept_per_expert"]
    top2 = sorted(range(4), key=lambda e: (-kept[e], e))[:2]
    assert done[1]["experts"] == top2
    bank, dense = teacher.decoder.blocks[1].ff[0].ffn.experts, student.decoder.blocks[1].ff[0].ffn
    for j, e in enumerate(top2):
        torch.testing.assert_close(dense.w_in[:, j * F : (j + 1) * F], bank.w_in[e])
        scale = usage["decoder"][0]["mean_gate_per_expert"][e]
        torch.testing.assert_close(dense.w_out[j * F : (j + 1) * F], bank.w_out[e] * scale)


def test_one_expert_seq2seq_teacher_distils_to_an_identical_student():
    # One expert, top-1, no capacity limit: each MoE layer computes 1.0 * expert(x) (the softmax over one expert is
    # 1), so the mean initialisation (that expert, w_out scaled by the mean kept gate 1.0) is the same function.
    teacher = tiny_seq2seq(num_experts=1, top_k=1, capacity_factor=None)
    usage = _s2s_usage(teacher)
    assert usage["encoder"][0]["mean_total_gate"] == 1.0 and usage["decoder"][0]["mean_total_gate"] == 1.0
    student = DistilledSeq2Seq(seq2seq_student_config(teacher.config))
    copy_non_expert_weights(teacher, student)
    init_seq2seq_student_ffns(teacher, student, "mean", usage)
    student.eval()
    for inputs, labels in _s2s_batches(1, seed=9):
        with torch.no_grad():
            t_out, s_out = teacher(inputs, labels), student(inputs, labels)
        torch.testing.assert_close(s_out.logits_BTV, t_out.logits_BTV, atol=1e-5, rtol=1e-5)
        assert float(s_out.ce_loss) == pytest.approx(float(t_out.ce_loss), abs=1e-5)


def test_seq2seq_distilled_loss_is_the_mix_over_target_tokens():
    teacher = tiny_seq2seq()
    student = DistilledSeq2Seq(seq2seq_student_config(teacher.config), teacher)
    inputs, labels = _s2s_batches(1)[0]
    labels[0, 4:] = -100
    student.train()
    out = student(inputs, labels)
    with torch.no_grad():
        t_logits = teacher(inputs, labels).logits_BTV
    mix = distillation_loss(out.logits_BTV, t_logits, labels)
    torch.testing.assert_close(out.loss, mix.loss)
    torch.testing.assert_close(out.ce_loss, mix.hard_ce)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    student.eval()
    plain = student(inputs, labels)
    torch.testing.assert_close(plain.loss, plain.ce_loss)


def test_ignored_targets_count_in_neither_term():
    # The hand-made token of test_loss_is_the_stated_mix_on_hand_made_logits, then a second token with label -100:
    # the same 1.317631, whatever the second token's logits.
    student = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0], [-5.0, 5.0]]])
    out = distillation_loss(student, teacher, torch.tensor([[0, -100]]))
    assert float(out.hard_ce) == pytest.approx(1.386294, abs=1e-6)
    assert float(out.soft_ce) == pytest.approx(1.111641, abs=1e-6)
    assert float(out.loss) == pytest.approx(1.317631, abs=1e-6)
