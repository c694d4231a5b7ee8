"""Parameter counts (total and active per token), FLOPs and the FLOP-matched dense model of the encoder-decoder.

Counted from a :class:`Seq2SeqConfig` without building the model, as ``models/flops.py`` does for the decoder LM;
tests check the totals against a built :class:`~moekit.models.Seq2SeqLM`'s ``numel``. Conventions are flops.py's: a
multiply-add is 2 FLOPs, forward = 2 x the active matmul parameters a token passes through + attention's scores and
weighted sum (``2 * K * H * d_kv`` per layer and query over K positions), training = 3 x forward. The embedding
lookup and the relative position bias lookup cost nothing; the output layer counts ``V * D`` per target token.
Token choice charges ``top_k`` experts per token (capacity drops not subtracted), expert choice
``capacity_factor`` (each expert takes ``c * T / E`` of T tokens).
"""

from __future__ import annotations

import dataclasses
import math

from moekit.errors import ConfigError
from moekit.layers.config import MoEConfig
from moekit.models.flops import _ffn_params, shared_expert_params
from moekit.models.seq2seq_config import STACKS, Seq2SeqConfig

__all__ = ["seq2seq_parameter_counts", "seq2seq_flops_per_token", "seq2seq_flop_matched_dense"]


def _experts_per_token(m: MoEConfig) -> float:
    return float(m.capacity_factor) if m.router == "expert_choice" else float(m.top_k)


def _router_params(m: MoEConfig) -> int:
    return m.num_experts * m.d_model * (2 if m.router == "topk" and m.noisy_gating else 1)


def _stack_counts(c: Seq2SeqConfig, stack: str) -> dict[str, float]:
    """Per stack: ``total``, ``active`` (per token), ``expert`` parameters and ``matmul`` (active parameters a token
    multiplies by, norms and the bias table excluded)."""
    D, inner = c.d_model, c.n_heads * c.d_kv
    n_attn = 2 if stack == "decoder" else 1  # the decoder adds cross-attention
    attn = 4 * D * inner  # q, k, v, o
    total = c.relative_attention_num_buckets * c.n_heads + D  # bias table + final norm
    active = float(total)
    matmul = 0.0
    expert = 0
    for i in range(c.n_layers(stack)):
        fixed = n_attn * (attn + D)  # attention weights and their pre-norms
        total += fixed
        active += fixed
        matmul += n_attn * attn
        for width in c.ffn_widths(stack, i):
            total += D  # the sublayer's pre-norm
            active += D
            if width is None:
                m = c.moe(stack)
                one = _ffn_params(D, m.d_ff, m.activation)
                router, shared = _router_params(m), shared_expert_params(m)
                expert += m.num_experts * one
                total += m.num_experts * one + router + shared
                used = _experts_per_token(m) * one + router + shared
                active += used
                matmul += used
            else:
                n = _ffn_params(D, width, c.activation)
                total += n
                active += n
                matmul += n
    return {"total": total, "active": active, "expert": expert, "matmul": matmul}


def seq2seq_parameter_counts(config: Seq2SeqConfig) -> dict[str, int]:
    """``{"total", "active", "embedding", "expert", "encoder_active", "decoder_active"}``: parameters in all; active
    ones (all but the experts a token does not visit: the embeddings, and per stack the router plus the experts a
    token visits in each MoE layer; ``*_active`` per stack, embeddings not included); in the embeddings (and the
    untied output layer); and in all expert banks."""
    c = config
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    enc, dec = _stack_counts(c, "encoder"), _stack_counts(c, "decoder")
    return {
        "total": round(embedding + enc["total"] + dec["total"]),
        "active": round(embedding + enc["active"] + dec["active"]),
        "embedding": embedding,
        "expert": enc["expert"] + dec["expert"],
        "encoder_active": round(enc["active"]),
        "decoder_active": round(dec["active"]),
    }


def seq2seq_flops_per_token(config: Seq2SeqConfig, input_len: int, target_len: int) -> dict[str, int]:
    """FLOPs of one example of ``input_len`` encoder tokens and ``target_len`` decoder tokens (teacher forcing).

    Returns ``forward_per_example`` and ``train_per_example``; ``forward`` and ``train`` per target token (the
    example's FLOPs over ``target_len``: what a loss token costs, encoder included); ``encoder_forward`` per input
    token and ``decoder_forward`` per target token (the cross-attention keys and values, computed once per input
    token and decoder block, are charged to the decoder's per-example total but not to ``decoder_forward``).
    """
    c = config
    S, T = int(input_len), int(target_len)
    if S < 1 or T < 1:
        raise ConfigError(f"input_len and target_len must be >= 1, got {input_len} and {target_len}")
    D, inner = c.d_model, c.n_heads * c.d_kv
    enc, dec = _stack_counts(c, "encoder"), _stack_counts(c, "decoder")
    n_dec = c.n_decoder_layers
    encoder_forward = 2 * enc["matmul"] + 2 * c.n_encoder_layers * S * inner
    cross_kv = n_dec * 2 * D * inner  # per input token: each decoder block's cross-attention k and v projections
    # Per target token: the decoder's matmuls except the cross-attention k, v (charged per input token above), the
    # output layer, self-attention over T positions and cross-attention over S.
    decoder_forward = 2 * (dec["matmul"] - cross_kv + c.vocab_size * D) + 2 * n_dec * (T + S) * inner
    per_example = S * encoder_forward + S * 2 * cross_kv + T * decoder_forward
    return {
        "forward_per_example": round(per_example),
        "train_per_example": round(3 * per_example),
        "forward": round(per_example / T),
        "train": round(3 * per_example / T),
        "encoder_forward": round(encoder_forward),
        "decoder_forward": round(decoder_forward),
    }


def seq2seq_flop_matched_dense(config: Seq2SeqConfig) -> Seq2SeqConfig:
    """The dense encoder-decoder with the same FLOPs per token, router matmuls aside: every MoE FFN becomes a dense
    FFN of hidden width ``experts per token * moe.d_ff`` (``top_k`` for token choice, ``capacity_factor`` for
    expert choice) plus the shared experts' width, in the same place (``dense_before_moe`` sublayers stay), as
    ``flop_matched_dense`` does for the decoder LM. Raises :class:`ConfigError` when the width is not an integer or
    the experts' activation differs from ``model.activation``."""
    c = config
    changes: dict[str, object] = {}
    for stack in STACKS:
        m = c.moe(stack)
        if m is None:
            continue
        if m.activation != c.activation:
            raise ConfigError(
                f"seq2seq_flop_matched_dense needs {stack}_moe.activation ({m.activation!r}) to equal"
                f" model.activation ({c.activation!r})"
            )
        exact = _experts_per_token(m) * m.d_ff + m.shared_hidden
        width = round(exact)
        if not math.isclose(exact, width, rel_tol=0, abs_tol=1e-9) or width < 1:
            raise ConfigError(
                f"the FLOP-matched dense width of the {stack} would be {exact:g} (experts per token x d_ff), not a"
                " positive integer"
            )
        changes[f"{stack}_moe"] = None
        changes[f"{stack}_dense_d_ff_at_moe"] = None if width == c.d_ff else width
    return dataclasses.replace(c, **changes)
