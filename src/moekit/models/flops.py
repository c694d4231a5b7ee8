"""Parameter counts (total and active per token), FLOPs per token, and the FLOP-matched dense model.

Counted analytically from the config so ``moekit validate`` can report them without building the model; tests check
the totals against a built model's ``numel``. FLOPs count a multiply-add as 2 (Kaplan et al. 2020): forward =
2 * active matmul parameters + attention's 2 * n_layers * seq_len * d_model, training = 3 * forward.
"""

from __future__ import annotations

import dataclasses

from moekit.experts.activations import GATED
from moekit.models.config import LMConfig

__all__ = ["parameter_counts", "flops_per_token", "flop_matched_dense", "shared_expert_params"]


def _ffn_params(d_model: int, d_ff: int, activation: str) -> int:
    return d_model * d_ff * (3 if activation in GATED else 2)


def shared_expert_params(moe: object) -> int:
    """Parameters of an MoE layer's shared experts and their gate (0 without them; 0 for Soft MoE). Every token
    uses all of them, so they count as active too."""
    hidden = getattr(moe, "shared_hidden", 0)
    if not hidden:
        return 0
    return _ffn_params(moe.d_model, hidden, moe.activation) + (moe.d_model if moe.shared_expert_gate else 0)


def _attention_params(c: LMConfig) -> tuple[int, int]:
    """``(matmul, other)`` parameters of one attention layer: the q, k, v, o weights; biases and q/k norm weights."""
    H, Hkv, Hd, D = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    matmul = D * (H + 2 * Hkv) * Hd + H * Hd * D
    other = (H + 2 * Hkv) * Hd * c.qkv_bias + D * c.out_bias
    other += {"none": 0, "projection": (H + Hkv) * Hd, "head": 2 * Hd}[c.qk_norm]
    return matmul, other


def parameter_counts(config: LMConfig) -> dict[str, int]:
    """``{"total", "active", "embedding", "expert"}``: parameters in all, used per token, in the (tied or not)
    embeddings, and in all expert banks. Active counts k experts per MoE layer plus the router."""
    c = config
    D = c.d_model
    embedding = c.vocab_size * D * (1 if c.tie_embeddings else 2)
    attn_matmul, attn_other = _attention_params(c)
    per_block_fixed = attn_matmul + attn_other + 2 * D  # attention + two RMSNorm weights
    total = embedding + D + c.n_layers * per_block_fixed  # + final norm
    active = total
    expert = 0
    for i in range(c.n_layers):
        if c.is_moe_layer(i):
            m = c.moe
            one = _ffn_params(D, m.d_ff, m.activation)
            router = m.num_experts * D * (2 if m.noisy_gating else 1)
            shared = shared_expert_params(m)
            expert += m.num_experts * one
            total += m.num_experts * one + router + shared
            active += m.top_k * one + router + shared
        else:
            n = _ffn_params(D, c.dense_d_ff(i), c.activation)
            total += n
            active += n
    return {"total": total, "active": active, "embedding": embedding, "expert": expert}


def flops_per_token(config: LMConfig, seq_len: int | None = None) -> dict[str, int]:
    """``{"forward", "train"}`` FLOPs per token at context ``seq_len`` (default ``max_seq_len``).

    The embedding lookup costs nothing; the output projection counts V * D. Routing bookkeeping (sort, gather) is
    not a matmul and is not counted; the router matmul is.
    """
    c = config
    T = c.max_seq_len if seq_len is None else seq_len
    counts = parameter_counts(c)
    # Active matmul parameters: everything active except the norm weights and attention biases; the embedding
    # matrix counts once, as the output projection (an untied input embedding is a lookup).
    _, attn_other = _attention_params(c)
    not_matmul = (2 * c.n_layers + 1) * c.d_model + c.n_layers * attn_other
    matmul = counts["active"] - counts["embedding"] + c.vocab_size * c.d_model - not_matmul
    # Scores and the weighted sum of values: 2 * T * (H * Hd) per layer and token (Kaplan's n_ctx * d_attn).
    forward = 2 * matmul + 2 * c.n_layers * T * c.n_heads * c.head_dim
    return {"forward": forward, "train": 3 * forward}


def flop_matched_dense(config: LMConfig) -> LMConfig:
    """The dense model with the same active FLOPs per token (router matmul aside): every MoE FFN becomes a dense
    FFN of hidden width ``top_k * moe.d_ff`` (the k experts a token visits) plus the shared experts' width,
    everything else unchanged (a shared-expert gate's D -> 1 product is routing and is not matched)."""
    if config.moe is None:
        return dataclasses.replace(config)
    m = config.moe
    if m.activation != config.activation:
        raise ValueError(
            f"flop_matched_dense needs the experts' activation ({m.activation!r}) to equal model.activation "
            f"({config.activation!r})"
        )
    width = m.top_k * m.d_ff + m.shared_hidden
    return dataclasses.replace(config, moe=None, dense_d_ff_at_moe=None if width == config.d_ff else width)
