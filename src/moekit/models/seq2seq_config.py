"""The encoder-decoder's config (T5 v1.1, Switch Transformers, ST-MoE layouts): widths, depths, relative position
buckets, which feed-forward layers of each stack are MoE, and the loss coefficients.

Kept apart from the model code (like ``models/config.py``) so a run config, ``moekit validate`` and the parameter /
FLOP counts (``models/seq2seq_flops.py``) can build and check a config without building a model.

MoE is configured per stack: ``encoder_moe`` and ``decoder_moe`` are independent :class:`MoEConfig` (or None). The
encoder sees the whole input at once, so any moekit router is allowed there (expert choice, batch-priority routing);
the decoder is causal, so routers that look across the sequence are refused there, in one line naming the reason.
Both stacks put MoE in every ``moe_every``-th feed-forward layer (block ``i`` when ``i % moe_every == moe_offset``);
``decoder_moe_every`` / ``decoder_moe_offset`` override that rule for the decoder (Hugging Face Switch configs may
use different steps for the two stacks).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import (
    MAX_LAYERS,
    check_at_most,
    check_bool,
    check_choice,
    check_int,
    check_non_negative,
    check_positive_int,
    check_positive_number,
    check_unit_interval,
    config_repr,
)
from moekit.errors import ConfigError
from moekit.experts.activations import ACTIVATIONS
from moekit.layers.config import MoEConfig, SoftMoEConfig

__all__ = ["Seq2SeqConfig", "STACKS"]

STACKS = ("encoder", "decoder")


@dataclass
class Seq2SeqConfig:
    """A T5 v1.1-style encoder-decoder whose feed-forward layers are dense or MoE.

    Attributes:
        vocab_size: V, shared by the encoder input, the decoder input and the output layer.
        d_model: width D.
        n_heads: attention heads H.
        d_kv: width of each head (T5's ``d_kv``, independent of D / H); None means ``d_model // n_heads``.
        d_ff: hidden width of the dense feed-forward layers.
        activation: dense FFN activation; T5 v1.1 is "geglu_tanh" (gated GELU, tanh form), T5 v1.0 "relu".
        n_encoder_layers: encoder blocks.
        n_decoder_layers: decoder blocks (None: ``n_encoder_layers``).
        relative_attention_num_buckets: buckets of the relative position bias (T5: 32).
        relative_attention_max_distance: distances from this on share the last bucket (T5: 128).
        encoder_moe: the encoder's MoE layer (any router), or None for a dense encoder.
        decoder_moe: the decoder's MoE layer (a causal-safe token-choice router), or None for a dense decoder.
        moe_every: every ``moe_every``-th FFN is MoE (Switch: 2; ST-MoE: 4).
        moe_offset: block ``i`` is MoE when ``i % moe_every == moe_offset`` (Switch's layout: 1).
        decoder_moe_every: the decoder's ``moe_every`` (None: ``moe_every``).
        decoder_moe_offset: the decoder's ``moe_offset`` (None: ``moe_offset``).
        dense_before_moe: ST-MoE's sparse-dense block: a block at an MoE position runs a dense FFN sublayer right
            before its MoE sublayer (each with its own pre-norm and residual). In a dense stack the MoE positions
            get the two dense sublayers too (so a FLOP-matched dense model keeps the layout).
        encoder_dense_d_ff_at_moe: dense encoder only: hidden width of the FFN at its MoE positions (the
            FLOP-matched dense model of a top-k MoE uses ``k * moe.d_ff`` there); None means ``d_ff``.
        decoder_dense_d_ff_at_moe: the same for a dense decoder.
        tie_embeddings: the output layer is the embedding matrix, and the decoder output is scaled by
            ``d_model ** -0.5`` before it (T5 v1.0, Mesh-TF); False (T5 v1.1) is a separate, unscaled output layer.
        dropout: T5's dropout rate: on the embeddings, every sublayer's output before its residual add, the
            attention probabilities, the dense FFN hidden activation and each stack's final norm output.
            (Expert hidden dropout is the MoE config's ``expert_dropout``.)
        norm_eps: epsilon of the RMS layer norms.
        init_scale: Switch init scale of attention and dense FFN weights (std = sqrt(s / fan_in); the query's
            fan-in includes ``d_kv``: T5 folds the 1 / sqrt(d_kv) score scaling into the query initialisation).
        decoder_start_token_id: the first decoder input (T5: 0, its padding id).
        pad_token_id: replaces ignored labels (-100) in the shifted decoder inputs (T5: 0).
        eos_token_id: end of sequence (T5: 1), kept for Hugging Face export and for callers of ``generate``.
        load_balance_coef: c_B, weight of the mean load-balancing loss over all MoE layers of both stacks.
        z_loss_coef: c_z, weight of the mean router z-loss over all MoE layers of both stacks.
    """

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    d_kv: int | None = None
    d_ff: int = 512
    activation: str = "geglu_tanh"
    n_encoder_layers: int = 4
    n_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    encoder_moe: MoEConfig | None = None
    decoder_moe: MoEConfig | None = None
    moe_every: int = 2
    moe_offset: int = 1
    decoder_moe_every: int | None = None
    decoder_moe_offset: int | None = None
    dense_before_moe: bool = False
    encoder_dense_d_ff_at_moe: int | None = None
    decoder_dense_d_ff_at_moe: int | None = None
    tie_embeddings: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_scale: float = 0.1
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int | None = None
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3

    def __repr__(self) -> str:
        return config_repr(self)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "moe_every",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            check_positive_int(f"model.{name}", getattr(self, name))
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_encoder_layers
        check_positive_int("model.n_decoder_layers", self.n_decoder_layers)
        for name in ("n_encoder_layers", "n_decoder_layers"):  # the layout checks and counts loop over the blocks
            check_at_most(f"model.{name}", getattr(self, name), MAX_LAYERS, "MAX_LAYERS, beyond any trainable depth")
        if self.d_kv is None:
            if self.d_model % self.n_heads != 0:
                raise ConfigError(
                    f"model.d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads; or set model.d_kv"
                )
            self.d_kv = self.d_model // self.n_heads
        check_positive_int("model.d_kv", self.d_kv)
        check_choice("model.activation", self.activation, sorted(ACTIVATIONS))
        self._check_buckets()
        self._check_layout()
        for name in ("tie_embeddings", "dense_before_moe"):
            check_bool(f"model.{name}", getattr(self, name))
        check_unit_interval("model.dropout", self.dropout)
        for name in ("norm_eps", "init_scale"):
            check_positive_number(f"model.{name}", getattr(self, name))
        for name in ("load_balance_coef", "z_loss_coef"):
            check_non_negative(f"model.{name}", getattr(self, name))
        for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None and name == "eos_token_id":
                continue
            check_int(f"model.{name}", value, 0)
            if value >= self.vocab_size:
                raise ConfigError(f"model.{name} must be < vocab_size={self.vocab_size}, got {value}")
        for stack in STACKS:
            self._check_moe(stack)

    def _check_buckets(self) -> None:
        # Bidirectional buckets halve the count per direction, and half of those are exact distances: at least one
        # exact bucket per direction needs >= 4 buckets. The logarithmic buckets span (max_exact, max_distance), so
        # max_distance must exceed the largest exact distance of the causal (unhalved) layout, num_buckets // 2.
        nb, md = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if nb < 4:
            raise ConfigError(f"model.relative_attention_num_buckets must be >= 4, got {nb}")
        if md <= nb // 2:
            raise ConfigError(
                f"model.relative_attention_max_distance must be > relative_attention_num_buckets // 2 = {nb // 2}"
                f" (the exact buckets end there), got {md}"
            )

    def _check_layout(self) -> None:
        if self.decoder_moe_every is None:
            self.decoder_moe_every = self.moe_every
        if self.decoder_moe_offset is None:
            self.decoder_moe_offset = self.moe_offset
        check_positive_int("model.decoder_moe_every", self.decoder_moe_every)
        for name, every in (("moe_offset", self.moe_every), ("decoder_moe_offset", self.decoder_moe_every)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < every:
                raise ConfigError(f"model.{name} must be an integer in [0, {every}), got {value!r}")
        for stack in STACKS:
            name = f"{stack}_dense_d_ff_at_moe"
            if getattr(self, name) is not None:
                check_positive_int(f"model.{name}", getattr(self, name))

    def _check_moe(self, stack: str) -> None:
        moe = self.moe(stack)
        if moe is None:
            return
        if isinstance(moe, SoftMoEConfig):
            raise ConfigError(
                f"model.{stack}_moe: Soft MoE mixes every token of a call into each slot (padding included, and in the"
                " decoder a token's future), so the Seq2SeqLM refuses it; use a MoEConfig"
            )
        if not isinstance(moe, MoEConfig):
            raise ConfigError(f"model.{stack}_moe must be a MoEConfig or None, got {type(moe).__name__}")
        if stack == "decoder" and not moe.is_causal_safe:
            what = "expert choice routing" if moe.router == "expert_choice" else "batch-priority routing"
            raise ConfigError(
                f"model.decoder_moe: {what} looks across the whole sequence (a token's routing would depend on later"
                " tokens), so it is refused in the causal decoder; it is allowed in encoder_moe"
            )
        if moe.d_model != self.d_model:
            raise ConfigError(f"model.{stack}_moe.d_model ({moe.d_model}) must equal model.d_model ({self.d_model})")
        if getattr(self, f"{stack}_dense_d_ff_at_moe") is not None:
            raise ConfigError(f"model.{stack}_dense_d_ff_at_moe applies to a dense {stack} only (no {stack}_moe)")
        if not self.moe_layers(stack):
            every, offset = self.layout(stack)
            raise ConfigError(
                f"model.{stack}_moe is set but no {stack} block is MoE with {self.n_layers(stack)} layers,"
                f" moe_every={every}, moe_offset={offset}"
            )

    # Layout queries (used by the model, the FLOP counter and the Hugging Face mapping).

    def moe(self, stack: str) -> MoEConfig | None:
        """The MoE config of ``stack`` ("encoder" or "decoder")."""
        return self.encoder_moe if stack == "encoder" else self.decoder_moe

    def n_layers(self, stack: str) -> int:
        return self.n_encoder_layers if stack == "encoder" else self.n_decoder_layers

    def layout(self, stack: str) -> tuple[int, int]:
        """``(moe_every, moe_offset)`` of ``stack``."""
        if stack == "encoder":
            return self.moe_every, self.moe_offset
        return self.decoder_moe_every, self.decoder_moe_offset

    def is_moe_position(self, stack: str, index: int) -> bool:
        """Whether block ``index`` of ``stack`` sits at an MoE position (MoE when the stack has MoE)."""
        every, offset = self.layout(stack)
        return index % every == offset

    def is_moe_layer(self, stack: str, index: int) -> bool:
        return self.moe(stack) is not None and self.is_moe_position(stack, index)

    def moe_layers(self, stack: str) -> list[int]:
        return [i for i in range(self.n_layers(stack)) if self.is_moe_layer(stack, i)]

    def ffn_widths(self, stack: str, index: int) -> list[int | None]:
        """The feed-forward sublayers of block ``index``, in order: a dense width, or None for the MoE layer."""
        if not self.is_moe_position(stack, index):
            return [self.d_ff]
        last: int | None = None
        if self.moe(stack) is None:
            last = getattr(self, f"{stack}_dense_d_ff_at_moe") or self.d_ff
        return [self.d_ff, last] if self.dense_before_moe else [last]
