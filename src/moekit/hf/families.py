"""The Hugging Face model families moekit reads and writes, and how each one's ``config.json`` maps onto an
:class:`~moekit.models.LMConfig` and back.

Sparse: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE. Dense (for sparse upcycling): Llama, Qwen2, Qwen3. What differs between
them is the attention (biases, grouped-query heads, where queries and keys are normalised), which blocks are MoE,
the router's gate normalisation and the shared expert; everything else is one pre-norm rotary decoder with SwiGLU
feed-forward layers and RMSNorm, which is moekit's :class:`~moekit.models.TransformerLM`. A config option a family
has but moekit does not compute (sliding windows, scaled rotary positions, clipped q/k/v) is refused in one line,
so a model is never loaded into a network that computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.errors import MoekitError
from moekit.layers.config import MoEConfig
from moekit.models.config import LMConfig

__all__ = ["Family", "FAMILIES", "family_for_model_type", "lm_config_from_hf", "hf_config_from_lm", "infer_family"]


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family.

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        architecture: the ``*ForCausalLM`` class name written to ``architectures``.
        sparse: an MoE family.
        moe_prefix: the module path of a block's MoE layer (``block_sparse_moe`` in Mixtral's checkpoints).
        expert_names: the checkpoint names of one expert's gate, up and down projections.
        qk_norm: the attention's query/key normalisation (``LMConfig.qk_norm``).
        bias: "none", "qkv" (Qwen2: q, k, v only) or "config" (``attention_bias`` for q, k, v and o).
        moe_layers: "all" (every block MoE) or "step" (``decoder_sparse_step`` and ``mlp_only_layers``).
        shared_expert: one gated shared expert per MoE layer (Qwen2-MoE).
    """

    model_type: str
    architecture: str
    sparse: bool
    moe_prefix: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    qk_norm: str = "none"
    bias: str = "config"
    moe_layers: str = "all"
    shared_expert: bool = False


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", False),
        Family("qwen2", "Qwen2ForCausalLM", False, bias="qkv"),
        Family("qwen3", "Qwen3ForCausalLM", False, qk_norm="head"),
        Family("mixtral", "MixtralForCausalLM", True, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
               bias="none"),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", True, bias="qkv", moe_layers="step", shared_expert=True),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", True, qk_norm="head", moe_layers="step"),
        Family("olmoe", "OlmoeForCausalLM", True, qk_norm="projection"),
    )
}


def family_for_model_type(model_type: Any) -> Family:
    if model_type not in FAMILIES:
        raise MoekitError(
            f"model_type {model_type!r} is not supported; moekit reads and writes {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def _rope_base(cfg: dict[str, Any]) -> float:
    """The rotary base of a transformers v5 (``rope_parameters``) or v4 (``rope_theta`` / ``rope_scaling``) config;
    scaled variants (linear, dynamic, YaRN, Llama 3) are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise MoekitError(f"rotary scaling {rope_type!r} is not supported (moekit computes unscaled rotary positions)")
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise MoekitError("partial rotary embeddings are not supported")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise MoekitError(f"config.json has no {key!r}, which a {cfg.get('model_type')} config must have")
    return cfg[key]


def lm_config_from_hf(cfg: dict[str, Any]) -> tuple[Family, LMConfig]:
    """The family and the :class:`LMConfig` of a Hugging Face ``config.json`` (as a dict)."""
    fam = family_for_model_type(cfg.get("model_type"))
    if cfg.get("hidden_act", "silu") != "silu":
        raise MoekitError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (moekit's gated FFN is SwiGLU: silu)")
    if cfg.get("mlp_bias"):
        raise MoekitError("mlp_bias = true is not supported (moekit's feed-forward layers have no biases)")
    if cfg.get("clip_qkv") is not None:
        raise MoekitError(f"clip_qkv = {cfg['clip_qkv']} is not supported (moekit does not clip q, k, v)")
    if cfg.get("use_sliding_window") or (fam.model_type == "mixtral" and cfg.get("sliding_window") is not None):
        raise MoekitError("sliding-window attention is not supported (moekit attends to the whole context)")
    if (cfg.get("pretraining_tp") or 1) != 1:
        raise MoekitError("pretraining_tp > 1 is not supported")
    D, H = int(_require(cfg, "hidden_size")), int(_require(cfg, "num_attention_heads"))
    n_layers = int(_require(cfg, "num_hidden_layers"))
    if fam.bias == "qkv":
        qkv_bias, out_bias = bool(cfg.get("qkv_bias", True)), False
    elif fam.bias == "config":
        qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
    else:
        qkv_bias = out_bias = False
    moe = None
    moe_every, moe_offset, dense_layers = 1, 0, []
    d_ff = int(_require(cfg, "intermediate_size"))
    if fam.sparse:
        # transformers v5 writes num_local_experts for every family (v4: num_experts outside Mixtral).
        E = int(_require(cfg, "num_local_experts" if cfg.get("num_local_experts") else "num_experts"))
        k = int(_require(cfg, "num_experts_per_tok"))
        expert_ff = int(_require(cfg, "moe_intermediate_size")) if fam.moe_layers == "step" else d_ff
        # Mixtral always renormalises the k softmax probabilities; the others follow norm_topk_prob.
        normalize = True if fam.model_type == "mixtral" else bool(cfg.get("norm_topk_prob", False))
        shared = {}
        if fam.shared_expert:
            shared = dict(num_shared_experts=1, shared_d_ff=int(_require(cfg, "shared_expert_intermediate_size")),
                          shared_expert_gate=True)
        # Training-time options carried over: the balance-loss weight (the z-loss weight where the family has one).
        moe = MoEConfig(d_model=D, d_ff=expert_ff, num_experts=E, top_k=k, capacity_factor=None, activation="swiglu",
                        normalize_gates=normalize, **shared)
        if fam.moe_layers == "step":
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            moe_every, moe_offset = step, step - 1
            dense_layers = [int(i) for i in cfg.get("mlp_only_layers") or []]
        if fam.moe_layers == "all":
            d_ff = expert_ff  # no dense FFN exists; keep the config self-consistent
    lm = LMConfig(
        vocab_size=int(_require(cfg, "vocab_size")),
        d_model=D,
        n_layers=n_layers,
        n_heads=H,
        n_kv_heads=int(cfg.get("num_key_value_heads") or H),
        head_dim=int(cfg.get("head_dim") or D // H),
        qk_norm=fam.qk_norm,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        d_ff=d_ff,
        max_seq_len=int(_require(cfg, "max_position_embeddings")),
        activation="swiglu",
        moe=moe,
        moe_every=moe_every,
        moe_offset=moe_offset,
        dense_layers=dense_layers,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_base=_rope_base(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        load_balance_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0) if fam.sparse else 1e-2,
        z_loss_coef=float(cfg.get("router_z_loss_coef", 0.0) or 0.0) if fam.sparse else 0.0,
    )
    if fam.sparse and lm.n_layers and not lm.moe_layers():
        raise MoekitError("the config makes no block MoE (decoder_sparse_step / mlp_only_layers)")
    return fam, lm


def _mismatch(fam: Family, c: LMConfig) -> str | None:
    """Why ``fam`` cannot represent ``c`` exactly (None when it can)."""
    m = c.moe
    if c.activation != "swiglu" or (m is not None and m.activation != "swiglu"):
        return "its feed-forward layers are not SwiGLU"
    if fam.sparse != (m is not None):
        return "it is dense" if m is None else "it is an MoE model"
    if c.qk_norm != fam.qk_norm:
        return f"its qk_norm is {c.qk_norm!r}, the family's {fam.qk_norm!r}"
    if fam.bias == "none" and (c.qkv_bias or c.out_bias):
        return "it has attention biases"
    if fam.bias == "qkv" and c.out_bias:
        return "it has an attention output bias"
    if fam.bias == "config" and c.qkv_bias != c.out_bias:
        return "its q/k/v and output biases differ"
    if m is None:
        return None
    if m.router != "topk" or m.score_func != "softmax" or m.expert_bias or m.num_expert_groups > 1 \
            or m.routed_scaling_factor != 1.0 or m.noisy_gating or m.batch_priority:
        return "its router is not plain softmax top-k"
    if m.second_expert_policy != "all":
        return "it drops second experts at random"
    normalize = m.normalize_gates if m.normalize_gates is not None else m.top_k > 1
    if fam.model_type == "mixtral" and not normalize:
        return "its gates are not renormalised"
    if fam.shared_expert != bool(m.num_shared_experts):
        return "it has shared experts" if m.num_shared_experts else "it has no shared expert"
    if fam.shared_expert and (m.num_shared_experts != 1 or not m.shared_expert_gate):
        return "its shared experts are not one gated shared expert"
    if fam.moe_layers == "all" and len(c.moe_layers()) != c.n_layers:
        return "not every block is MoE"
    return None


def infer_family(c: LMConfig) -> Family:
    """The first family that represents ``c`` exactly (a one-line error naming why each one cannot, otherwise)."""
    reasons = []
    for fam in FAMILIES.values():
        why = _mismatch(fam, c)
        if why is None:
            return fam
        reasons.append(f"{fam.model_type}: {why}")
    raise MoekitError("no Hugging Face family represents this model exactly (" + "; ".join(reasons) + ")")


def hf_config_from_lm(c: LMConfig, fam: Family, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``c`` in family ``fam`` (which must represent it: see :func:`infer_family`).
    ``extra`` (e.g. the token ids of an imported config) is kept where it does not contradict the model."""
    why = _mismatch(fam, c)
    if why is not None:
        raise MoekitError(f"a {fam.model_type} model cannot represent this model exactly: {why}")
    out: dict[str, Any] = {k: v for k, v in (extra or {}).items() if k in _KEPT_KEYS}
    out.update(
        model_type=fam.model_type,
        architectures=[fam.architecture],
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        rope_theta=c.rope_base,
        tie_word_embeddings=c.tie_embeddings,
        attention_dropout=0.0,
        dtype="float32",
    )
    if fam.bias == "config":
        out["attention_bias"] = c.qkv_bias
    elif fam.bias == "qkv":
        out["qkv_bias"] = c.qkv_bias
    if fam.model_type == "mixtral":
        out["sliding_window"] = None
    if fam.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out["use_sliding_window"] = False
    if fam.model_type in ("llama",):
        out["mlp_bias"] = False
    m = c.moe
    if m is None:
        out["intermediate_size"] = c.d_ff
        return out
    out["num_experts_per_tok"] = m.top_k
    out["router_aux_loss_coef"] = c.load_balance_coef
    out["output_router_logits"] = False
    if fam.model_type == "mixtral":
        out.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff, router_jitter_noise=0.0)
    else:
        out["num_experts"] = out["num_local_experts"] = m.num_experts  # v4 reads the first, v5 the second
        out["norm_topk_prob"] = bool(m.normalize_gates if m.normalize_gates is not None else m.top_k > 1)
    if fam.model_type == "olmoe":
        out.update(intermediate_size=m.d_ff, clip_qkv=None, router_z_loss_coef=c.z_loss_coef)
    if fam.moe_layers == "step":
        moe_blocks = set(c.moe_layers())
        out.update(
            intermediate_size=c.d_ff,
            moe_intermediate_size=m.d_ff,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(c.n_layers) if i not in moe_blocks],
        )
    if fam.shared_expert:
        out["shared_expert_intermediate_size"] = m.shared_hidden
    return out


# Keys of an imported config.json worth keeping on export (token ids and generation defaults).
_KEPT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache")
