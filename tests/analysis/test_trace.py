"""The routing trace is exactly what each MoE layer did: same choices and gates as the layer's own decision, and
the kept flags reproduce the layer's output token by token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moekit.analysis.trace import RoutingTrace, iter_windows, trace_model, trace_seq2seq
from moekit.errors import MoekitError
from moekit.experts.activations import ACTIVATIONS
from moekit.models import TransformerLM
from moekit.models.flops import flop_matched_dense
from moekit.models.seq2seq import Seq2SeqLM
from moekit.models.seq2seq_flops import seq2seq_flop_matched_dense
from tests.analysis.tiny_moe import tiny_moe, tiny_moe_config, tiny_seq2seq, tiny_seq2seq_config


def _capture(model: TransformerLM):
    """Forward hooks recording each MoE layer's input and (y, aux)."""
    seen: list[list] = [[] for _ in model.moe_layers]
    hooks = [
        layer.register_forward_hook(lambda mod, inp, out, i=i: seen[i].append((inp[0].detach(), out)))
        for i, layer in enumerate(model.moe_layers)
    ]
    return seen, hooks


@pytest.mark.parametrize("top_k", [1, 2])
def test_trace_matches_layer_decisions_and_output(top_k):
    model = tiny_moe(top_k=top_k)
    tokens_BT = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(1))
    seen, hooks = _capture(model)
    trace = trace_model(model, [tokens_BT[:3], tokens_BT[3:]])
    for h in hooks:
        h.remove()
    assert trace.layer_blocks == [1, 3]
    assert trace.num_tokens == 96 and trace.top_k == top_k
    np.testing.assert_array_equal(trace.token_ids_N, tokens_BT.reshape(-1).numpy())
    total_dropped = 0
    for li, layer in enumerate(model.moe_layers):
        assert len(seen[li]) == 2  # one call per batch
        ids = np.concatenate([out[1].routing.expert_ids_SK.numpy() for _, out in seen[li]])
        gates = np.concatenate([out[1].routing.gates_SK.numpy() for _, out in seen[li]])
        np.testing.assert_array_equal(trace.expert_ids_LNK[li], ids)
        np.testing.assert_allclose(trace.gates_LNK[li], gates)
        # Kept assignments per expert, per call, equal the layer's own tokens_per_expert and drop fraction.
        for call, (x_SD, (y, aux)) in enumerate(seen[li]):
            rows = slice(call * 48, (call + 1) * 48)
            kept_SK = trace.kept_LNK[li][rows]
            ids_SK = trace.expert_ids_LNK[li][rows]
            np.testing.assert_array_equal(np.bincount(ids_SK[kept_SK], minlength=4), aux.tokens_per_expert.numpy())
            assert np.isclose(1 - kept_SK.mean(), float(aux.drop_fraction))
            total_dropped += int((~kept_SK).sum())
            # Rebuild the layer output from the trace alone: sum over kept choices of gate * expert(x).
            bank = layer.experts
            act = ACTIVATIONS[bank.activation]
            x_SD = x_SD.reshape(-1, 16)
            y_ref = torch.zeros_like(x_SD)
            gates_SK = torch.from_numpy(trace.gates_LNK[li][rows])
            for s in range(x_SD.shape[0]):
                for k in range(top_k):
                    if kept_SK[s, k]:
                        e = int(ids_SK[s, k])
                        y_ref[s] += gates_SK[s, k] * (act(x_SD[s] @ bank.w_in[e]) @ bank.w_out[e])
            torch.testing.assert_close(y.reshape(-1, 16), y_ref, atol=1e-5, rtol=1e-4)
    assert total_dropped > 0  # CF 1.0 with a decisive router: the test covers dropping


def test_trace_files_round_trip(tmp_path):
    model = tiny_moe(top_k=2)
    tokens = np.arange(64) % 50
    trace = trace_model(model, iter_windows(tokens, 16, 2, None))
    assert trace.num_tokens == 64
    np.testing.assert_array_equal(trace.window_N[:17], [0] * 16 + [1])
    np.testing.assert_array_equal(trace.position_N[:17], list(range(16)) + [0])
    back = RoutingTrace.load(trace.save_safetensors(tmp_path / "t.safetensors"))
    assert back.layer_blocks == trace.layer_blocks and back.num_experts == 4
    for name in ("token_ids_N", "expert_ids_LNK", "gates_LNK", "kept_LNK", "probs_LNE"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    lines = (trace.write_jsonl(tmp_path / "t.jsonl", [f"t{i}" for i in range(64)])).read_text().splitlines()
    assert len(lines) == 64
    row = json.loads(lines[5])
    assert row["token"] == "t5" and row["token_id"] == 5 and [la["block"] for la in row["layers"]] == [1, 3]
    assert row["layers"][1]["experts"] == trace.expert_ids_LNK[1, 5].tolist()
    assert row["layers"][0]["kept"] == trace.kept_LNK[0, 5].tolist()


def test_dense_model_is_refused():
    dense = TransformerLM(flop_matched_dense(tiny_moe_config()))
    with pytest.raises(MoekitError, match="no MoE layers"):
        trace_model(dense, [torch.zeros(1, 4, dtype=torch.long)])


def test_iter_windows_caps_tokens():
    windows = list(iter_windows(np.arange(100), 10, 4, max_tokens=35))
    assert [w.shape for w in windows] == [(3, 10)]
    with pytest.raises(MoekitError, match="fewer than one window"):
        list(iter_windows(np.arange(5), 10, 4, None))


def test_seq2seq_trace_is_each_stacks_own_routing():
    model = tiny_seq2seq()
    g = torch.Generator().manual_seed(2)
    inputs_BS = torch.randint(2, 50, (4, 12), generator=g)
    labels_BT = torch.randint(2, 50, (4, 6), generator=g)
    labels_BT[1, 4:] = -100  # two ignored targets: left out of the decoder trace
    seen, hooks = _capture(model)
    traces = trace_seq2seq(model, [(inputs_BS[:2], labels_BT[:2]), (inputs_BS[2:], labels_BT[2:])])
    for h in hooks:
        h.remove()
    enc, dec = traces["encoder"], traces["decoder"]
    assert enc.layer_blocks == [1] and dec.layer_blocks == [1]
    assert enc.num_tokens == 4 * 12 and dec.num_tokens == 4 * 6 - 2
    np.testing.assert_array_equal(enc.token_ids_N, inputs_BS.reshape(-1).numpy())
    decoder_in_BT = model.shift_right(labels_BT)
    keep_N = (labels_BT != -100).reshape(-1).numpy()
    np.testing.assert_array_equal(dec.token_ids_N, decoder_in_BT.reshape(-1).numpy()[keep_N])
    assert dec.token_ids_N[0] == 0 and dec.position_N[6:10].tolist() == [0, 1, 2, 3]  # start id; row 1 cut at 4
    np.testing.assert_array_equal(dec.window_N, np.repeat(np.arange(4), 6)[keep_N])
    # The model's MoE layers in order are encoder block 1, decoder block 1: each trace is its layer's decisions.
    for trace, calls, rows in ((enc, seen[0], None), (dec, seen[1], keep_N)):
        ids = np.concatenate([out[1].routing.expert_ids_SK.numpy() for _, out in calls])
        kept = np.concatenate([out[1].plan.kept_mask_SK().numpy() for _, out in calls])
        if rows is not None:
            ids, kept = ids[rows], kept[rows]
        np.testing.assert_array_equal(trace.expert_ids_LNK[0], ids)
        np.testing.assert_array_equal(trace.kept_LNK[0], kept)
    assert (~enc.kept_LNK[0]).any()  # CF 1.0 with decisive routers drops some choices


def test_seq2seq_dense_model_is_refused():
    dense = Seq2SeqLM(seq2seq_flop_matched_dense(tiny_seq2seq_config()))
    batch = (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(MoekitError, match="no MoE layers"):
        trace_seq2seq(dense, [batch])
