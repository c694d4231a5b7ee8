"""The decoder-only language model's config: widths, depth, which FFNs are MoE, and the loss coefficients.

Kept apart from the model code so the command line, ``moekit validate`` and the FLOP counter can build and check a
config without building a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import (
    check_choice,
    check_non_negative,
    check_positive_int,
    check_positive_number,
    check_unit_interval,
)
from moekit.errors import ConfigError
from moekit.experts.activations import ACTIVATIONS
from moekit.layers.config import MoEConfig, SoftMoEConfig

__all__ = ["LMConfig"]


@dataclass
class LMConfig:
    """A pre-norm decoder-only transformer LM (GLaM / Switch decoder style).

    Attributes:
        vocab_size: V, set from the tokenizer.
        d_model: width D.
        n_layers: number of blocks.
        n_heads: attention heads (``d_model / n_heads`` must be even, for rotary positions).
        d_ff: hidden width of the dense FFNs.
        max_seq_len: longest sequence (rotary tables are built for it).
        activation: FFN activation ("relu", "gelu", "swiglu", "geglu").
        moe: the MoE layer (any causal-safe token-choice ``MoEConfig``), or None for a dense model.
        moe_every: every ``moe_every``-th FFN is MoE (2 = Switch, GLaM; 4 = ST-MoE).
        moe_offset: block ``i`` is MoE when ``i % moe_every == moe_offset``.
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
    d_ff: int = 512
    max_seq_len: int = 128
    activation: str = "gelu"
    moe: MoEConfig | None = None
    moe_every: int = 2
    moe_offset: int = 1
    dense_d_ff_at_moe: int | None = None
    tie_embeddings: bool = True
    init_scale: float = 0.1
    rope_base: float = 10000.0
    dropout: float = 0.0
    norm_eps: float = 1e-6
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "moe_every"):
            check_positive_int(f"model.{name}", getattr(self, name))
        if self.d_model % self.n_heads != 0 or (self.d_model // self.n_heads) % 2 != 0:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of"
                " even width (rotary positions rotate pairs of channels)"
            )
        check_choice("model.activation", self.activation, sorted(ACTIVATIONS))
        if not isinstance(self.moe_offset, int) or not 0 <= self.moe_offset < self.moe_every:
            raise ConfigError(
                f"model.moe_offset must be an integer in [0, moe_every={self.moe_every}),"
                f" got {self.moe_offset!r}"
            )
        if self.dense_d_ff_at_moe is not None:
            check_positive_int("model.dense_d_ff_at_moe", self.dense_d_ff_at_moe)
        check_unit_interval("model.dropout", self.dropout)
        for name in ("load_balance_coef", "z_loss_coef"):
            check_non_negative(f"model.{name}", getattr(self, name))
        for name in ("init_scale", "rope_base", "norm_eps"):
            check_positive_number(f"model.{name}", getattr(self, name))
        self._check_moe()

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
        return self.moe is not None and index % self.moe_every == self.moe_offset

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]
