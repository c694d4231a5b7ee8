"""The decoder-only language model's config: widths, depth, which FFNs are MoE, and the loss coefficients.

Kept apart from the model code so the command line, ``moekit validate`` and the FLOP counter can build and check a
config without building a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.config import (
    MAX_LAYERS,
    MAX_SEQ_LEN,
    check_at_most,
    check_bool,
    check_choice,
    check_non_negative,
    check_positive_int,
    check_positive_number,
    check_unit_interval,
    config_repr,
)
from moekit.errors import ConfigError
from moekit.experts.activations import ACTIVATIONS
from moekit.layers.config import MoEConfig, SoftMoEConfig

__all__ = ["LMConfig", "QK_NORMS"]

# Where queries and keys are RMS-normalised before the rotary rotation: "projection" over each whole projection
# (OLMoE: q over H * Hd channels, k over Hkv * Hd), "head" over each head's Hd channels (Qwen3, OLMo 2 style).
QK_NORMS = ("none", "projection", "head")


@dataclass
class LMConfig:
    """A pre-norm decoder-only transformer LM (GLaM / Switch decoder style).

    Attributes:
        vocab_size: V, set from the tokenizer.
        d_model: width D.
        n_layers: number of blocks.
        n_heads: attention (query) heads H.
        n_kv_heads: key/value heads (grouped-query attention: each serves ``n_heads / n_kv_heads`` query heads);
            None means ``n_heads`` (multi-head attention).
        head_dim: width Hd of each head (even, for rotary positions); None means ``d_model / n_heads``.
        qk_norm: "none", "projection" (OLMoE) or "head" (Qwen3): see :data:`QK_NORMS`.
        qkv_bias: biases on the query, key and value projections (Qwen2, Qwen2-MoE).
        out_bias: a bias on the attention output projection (Llama's ``attention_bias`` sets both).
        d_ff: hidden width of the dense FFNs.
        max_seq_len: longest sequence (rotary tables are built for it).
        activation: FFN activation ("relu", "gelu", "swiglu", "geglu").
        moe: the MoE layer (any causal-safe token-choice ``MoEConfig``), or None for a dense model.
        moe_every: every ``moe_every``-th FFN is MoE (2 = Switch, GLaM; 4 = ST-MoE).
        moe_offset: block ``i`` is MoE when ``i % moe_every == moe_offset``.
        dense_layers: blocks kept dense although the rule above makes them MoE (Qwen-MoE's ``mlp_only_layers``).
        dense_d_ff_at_moe: dense model only: hidden width of the FFNs at the MoE positions (a FLOP-matched dense
            model of a top-k MoE uses ``k * moe.d_ff`` there); None means ``d_ff``.
        tie_embeddings: share the input embedding and the output projection.
        init_scale: Switch init scale for attention and dense FFN weights (std = sqrt(s / fan_in)).
        rope_base: rotary base frequency.
        dropout: residual dropout after attention and FFN.
        norm_eps: RMSNorm epsilon.
        load_balance_coef: c_B, weight of the mean load-balancing loss over MoE layers (Switch: 1e-2).
        z_loss_coef: c_z, weight of the mean router z-loss over MoE layers (ST-MoE: 1e-3).
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: str = "none"
    qkv_bias: bool = False
    out_bias: bool = False
    d_ff: int = 512
    max_seq_len: int = 128
    activation: str = "gelu"
    moe: MoEConfig | None = None
    moe_every: int = 2
    moe_offset: int = 1
    dense_layers: list[int] = field(default_factory=list)
    dense_d_ff_at_moe: int | None = None
    tie_embeddings: bool = True
    init_scale: float = 0.1
    rope_base: float = 10000.0
    dropout: float = 0.0
    norm_eps: float = 1e-6
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3

    def __repr__(self) -> str:
        return config_repr(self)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "moe_every"):
            check_positive_int(f"model.{name}", getattr(self, name))
        # The layout checks and counts loop over the blocks, the rotary tables over the positions.
        check_at_most("model.n_layers", self.n_layers, MAX_LAYERS, "MAX_LAYERS, beyond any trainable depth")
        check_at_most("model.max_seq_len", self.max_seq_len, MAX_SEQ_LEN, "MAX_SEQ_LEN, about a million tokens")
        self._check_attention()
        check_choice("model.activation", self.activation, sorted(ACTIVATIONS))
        if isinstance(self.moe_offset, bool) or not isinstance(self.moe_offset, int) \
                or not 0 <= self.moe_offset < self.moe_every:
            raise ConfigError(
                f"model.moe_offset must be an integer in [0, moe_every={self.moe_every}),"
                f" got {self.moe_offset!r}"
            )
        if self.dense_d_ff_at_moe is not None:
            check_positive_int("model.dense_d_ff_at_moe", self.dense_d_ff_at_moe)
        if not isinstance(self.dense_layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in self.dense_layers
        ):
            raise ConfigError(
                f"model.dense_layers must be a list of block indices in [0, n_layers={self.n_layers}),"
                f" got {self.dense_layers!r}"
            )
        self.dense_layers = sorted(set(self.dense_layers))
        check_unit_interval("model.dropout", self.dropout)
        for name in ("load_balance_coef", "z_loss_coef"):
            check_non_negative(f"model.{name}", getattr(self, name))
        for name in ("init_scale", "rope_base", "norm_eps"):
            check_positive_number(f"model.{name}", getattr(self, name))
        self._check_moe()

    def _check_attention(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_positive_int("model.n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads}):"
                " each key/value head serves the same number of query heads"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0 or (self.d_model // self.n_heads) % 2 != 0:
                raise ConfigError(
                    f"model.d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of"
                    " even width (rotary positions rotate pairs of channels); or set model.head_dim"
                )
            self.head_dim = self.d_model // self.n_heads
        check_positive_int("model.head_dim", self.head_dim)
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"model.head_dim must be even (rotary positions rotate pairs of channels), got {self.head_dim}"
            )
        if self.qk_norm is None:  # TOML configs spell "none" and may arrive as None
            self.qk_norm = "none"
        check_choice("model.qk_norm", self.qk_norm, QK_NORMS)
        for name in ("qkv_bias", "out_bias", "tie_embeddings"):
            check_bool(f"model.{name}", getattr(self, name))

    def _check_moe(self) -> None:
        if self.moe is None:
            return
        if isinstance(self.moe, SoftMoEConfig):
            raise ConfigError(
                "Soft MoE mixes every token of a sequence into each slot, so a token would see its future: "
                "it is refused in the causal TransformerLM (use it in an encoder or ViT)"
            )
        if not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"model.moe must be a MoEConfig or None, got {type(self.moe).__name__}")
        if not self.moe.is_causal_safe:
            what = "expert choice routing" if self.moe.router == "expert_choice" else "batch-priority routing"
            raise ConfigError(
                f"{what} looks across the whole sequence (a token's routing would depend on later tokens),"
                " so it is refused in the causal TransformerLM;"
                " use moe.router = 'topk' without batch_priority"
            )
        if self.moe.d_model != self.d_model:
            raise ConfigError(f"moe.d_model ({self.moe.d_model}) must equal model.d_model ({self.d_model})")
        if self.dense_d_ff_at_moe is not None:
            raise ConfigError("model.dense_d_ff_at_moe applies to dense models only (no [moe] section)")
        if not self.moe_layers():
            raise ConfigError(
                f"no block is MoE with n_layers={self.n_layers}, moe_every={self.moe_every}, "
                f"moe_offset={self.moe_offset}"
            )

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` has an MoE FFN (always False for a dense model)."""
        return (
            self.moe is not None and index % self.moe_every == self.moe_offset and index not in self.dense_layers
        )

    def dense_d_ff(self, index: int) -> int:
        """Hidden width of block ``index``'s FFN when it is dense: ``dense_d_ff_at_moe`` at the MoE positions of a
        dense model (when set), else ``d_ff``."""
        at_moe_position = self.moe is None and index % self.moe_every == self.moe_offset
        return self.dense_d_ff_at_moe if (at_moe_position and self.dense_d_ff_at_moe) else self.d_ff

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]
