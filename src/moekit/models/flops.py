"""Parameter counts (total and active per token), FLOPs per token, and the FLOP-matched dense model.

Counted analytically from the config so ``moekit validate`` can report them without building the model; tests check
the totals against a built model's ``numel``. ``parameter_counts`` and ``flops_per_token`` take a config or a model
built from one (its ``.config``): ``parameter_counts(model) == parameter_counts(model.config)``. FLOPs count a
multiply-add as 2 (Kaplan et al. 2020): forward = 2 * active matmul parameters + attention's
2 * n_layers * seq_len * d_model, training = 3 * forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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


def _config_of(config_or_model: Any, function: str) -> Any:
    """The config of ``config_or_model``: the value itself when it is a config, else the model's ``.config``."""
    config = getattr(config_or_model, "config", config_or_model)
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(
            f"{function} takes a model config (LMConfig, ViTConfig, Seq2SeqConfig) or a model built from one, "
            f"got {type(config_or_model).__name__}"
        )
    return config


def parameter_counts(config: Any) -> dict[str, int]:
    """``{"total", "active", "embedding", "expert"}``: parameters in all, used per token, in the (tied or not)
    embeddings, and in all expert banks. Active counts k experts per MoE layer plus the router.

    ``config``: an :class:`LMConfig` or a model built from one (``TransformerLM``); a ViT or encoder-decoder
    config or model is counted by :func:`~moekit.models.vit_parameter_counts` or
    :func:`~moekit.models.seq2seq_parameter_counts` (their keys)."""
    c = _config_of(config, "parameter_counts")
    if not isinstance(c, LMConfig):
        # Imported here: both modules import this one.
        from moekit.models.seq2seq_config import Seq2SeqConfig
        from moekit.models.seq2seq_flops import seq2seq_parameter_counts
        from moekit.models.vit import ViTConfig, vit_parameter_counts

        if isinstance(c, ViTConfig):
            return vit_parameter_counts(c)
        if isinstance(c, Seq2SeqConfig):
            return seq2seq_parameter_counts(c)
        raise TypeError(f"parameter_counts takes an LMConfig, ViTConfig or Seq2SeqConfig (or a model built from "
                        f"one), got {type(c).__name__}")
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


def flops_per_token(config: Any, seq_len: int | None = None) -> dict[str, int]:
    """``{"forward", "train"}`` FLOPs per token at context ``seq_len`` (default ``max_seq_len``) of an
    :class:`LMConfig` or a ``TransformerLM`` (a ViT: :func:`~moekit.models.vit_flops_per_image`; an
    encoder-decoder: :func:`~moekit.models.seq2seq_flops_per_token`).

    The embedding lookup costs nothing; the output projection counts V * D. Routing bookkeeping (sort, gather) is
    not a matmul and is not counted; the router matmul is.
    """
    c = _config_of(config, "flops_per_token")
    if not isinstance(c, LMConfig):
        other = {"ViTConfig": "vit_flops_per_image", "Seq2SeqConfig": "seq2seq_flops_per_token"}.get(type(c).__name__)
        hint = f"; use moekit.models.{other}" if other else ""
        raise TypeError(f"flops_per_token takes an LMConfig or a TransformerLM, got {type(c).__name__}{hint}")
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
