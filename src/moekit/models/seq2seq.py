"""``Seq2SeqLM``: the T5 v1.1 encoder-decoder, with dense or MoE feed-forward layers (Switch Transformers, ST-MoE).

What makes it T5 (docs/ALGORITHMS.md section 21), each needed to reproduce Hugging Face's ``T5ForConditionalGeneration``
and ``SwitchTransformersForConditionalGeneration`` exactly on the same weights:

- RMS layer norm without bias or mean subtraction, variance in float32 (moekit's :class:`RMSNorm`), pre-norm
  sublayers, and a final norm per stack;
- no position embeddings: a learned bias per head and *bucketed* relative distance is added to the attention
  scores (bidirectional buckets in the encoder, causal ones in the decoder). The table lives in the first block's
  self-attention of each stack; the bias it gives is computed once per call and shared by every block;
- attention scores are not scaled by 1 / sqrt(d_kv) (T5 folds that factor into the query initialisation), and the
  head width ``d_kv`` is independent of ``d_model / n_heads``;
- the decoder block is self-attention, cross-attention over the encoder output, then feed-forward;
- gated GELU (tanh form) feed-forward layers without biases; no biases anywhere;
- an untied output layer (v1.1), or the embedding matrix with the decoder output scaled by ``d_model ** -0.5`` (v1.0);
- dropout, at one rate, on the embeddings, each sublayer's output, the attention probabilities, the FFN hidden
  activation and each stack's final output.

The MoE feed-forward layers are moekit's :class:`~moekit.layers.MoE` (any router in the encoder, causal-safe ones in
the decoder). Encoder padding is masked out of attention and, for token-choice routers, out of the experts' capacity
and the auxiliary losses (``MoE.forward(mask=...)``); ignored targets (label -100) likewise in the decoder.

Decoding keeps a cache (:class:`Seq2SeqCache`): the decoder self-attention's keys and values grow by one position per
step and the cross-attention's keys and values are computed once from the encoder output, so no step recomputes the
prefix or the encoder.

Shape legend: B batch, S input (encoder) length, T target (decoder) length, K attended positions, D model width,
H heads, Dk head width (``d_kv``), V vocabulary, N relative-position buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.init import switch_init_
from moekit.layers.aux import MoEAux, model_loss
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.models.blocks import LayerKVCache, RMSNorm
from moekit.models.seq2seq_config import Seq2SeqConfig

__all__ = [
    "Seq2SeqLM",
    "Seq2SeqOutput",
    "Seq2SeqCache",
    "T5Attention",
    "T5Block",
    "T5Stack",
    "RelativePositionBias",
    "relative_position_bucket",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100  # labels the loss skips (Hugging Face's and PyTorch's convention)


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of each ``relative_position = key position - query position`` (int64 tensor, any shape).

    Bidirectional (the encoder): half of the buckets are for keys before the query, half for keys after it.
    Causal (the decoder): only keys at or before the query count; a later key falls into bucket 0 (it is masked
    anyway). Within a direction, distances below ``n // 2`` (n = buckets per direction) get a bucket each; larger
    distances share logarithmically wider buckets up to ``max_distance``, and everything farther shares the last.
    The float32 logarithm is computed in Mesh-TF's (and Hugging Face's) order of operations, so a distance on a
    bucket boundary lands in the same bucket.
    """
    n = num_buckets
    if bidirectional:
        n //= 2
        offset = (relative_position > 0).to(torch.long) * n  # keys after the query: the upper half
        distance = relative_position.abs()
    else:
        offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    exact = n // 2
    # clamp(min=1) only keeps log() finite for the small distances, which take the exact branch anyway.
    log_scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (n - exact)
    large = (exact + log_scaled.to(torch.long)).clamp(max=n - 1)
    return offset + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """The learned bias of each head and relative-position bucket, ``weight`` ``[N, H]`` (Hugging Face's
    ``relative_attention_bias`` embedding)."""

    def __init__(self, num_buckets: int, max_distance: int, n_heads: int, *, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, n_heads))

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> Tensor:
        """``[1, H, q_len, k_len]``: queries at positions ``offset .. offset + q_len - 1``, keys at
        ``0 .. k_len - 1``."""
        device = self.weight.device
        q_pos_T1 = torch.arange(offset, offset + q_len, device=device)[:, None]
        k_pos_1K = torch.arange(k_len, device=device)[None, :]
        bucket_TK = relative_position_bucket(
            k_pos_1K - q_pos_T1, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return F.embedding(bucket_TK, self.weight).permute(2, 0, 1).unsqueeze(0)

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"


class T5Attention(nn.Module):
    """Multi-head attention without score scaling and without biases; the scores get an additive ``bias`` (the
    relative position bias and the masks, combined by the stack).

    Parameters: ``w_q`` ``[H Dk, D]``, ``w_kv`` ``[2 H Dk, D]`` (keys, then values), ``w_out`` ``[D, H Dk]``; the first
    self-attention of a stack also owns ``relative_bias``. ``cross`` attention takes keys and values from the
    encoder output (``memory``).
    """

    def __init__(
        self, d_model: int, n_heads: int, d_kv: int, init_scale: float, *, dropout: float = 0.0, cross: bool = False,
        relative_bias: RelativePositionBias | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.d_kv, self.cross, self.dropout = n_heads, d_kv, cross, float(dropout)
        inner = n_heads * d_kv
        self.w_q = nn.Parameter(torch.empty(inner, d_model))
        self.w_kv = nn.Parameter(torch.empty(2 * inner, d_model))
        self.w_out = nn.Parameter(torch.empty(d_model, inner))
        self.relative_bias = relative_bias
        # T5 does not divide the scores by sqrt(d_kv); the query's initial scale carries that factor instead
        # (Mesh-TF: std (D * d_kv) ** -0.5 for the query, D ** -0.5 for keys and values).
        switch_init_(self.w_q, fan_in=d_model * d_kv, init_scale=init_scale)
        switch_init_(self.w_kv, fan_in=d_model, init_scale=init_scale)
        switch_init_(self.w_out, fan_in=inner, init_scale=init_scale)
        if relative_bias is not None:
            nn.init.normal_(relative_bias.weight, mean=0.0, std=d_model**-0.5)

    def _heads(self, x_BKD: Tensor, w: Tensor) -> Tensor:
        B, K, _ = x_BKD.shape
        return F.linear(x_BKD, w).view(B, K, -1, self.d_kv).transpose(1, 2)

    def keys_values(self, x_BKD: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, H, K, Dk]`` of ``x`` (for cross-attention: computed once per encoder output)."""
        kv_BHKDk = self._heads(x_BKD, self.w_kv)
        return kv_BHKDk.split(self.n_heads, dim=1)

    def forward(
        self, x_BTD: Tensor, bias_BHTK: Tensor | None, *, memory_BSD: Tensor | None = None,
        cache: LayerKVCache | CrossKV | None = None,
    ) -> Tensor:
        """Self-attention over ``x`` (``cache``: a :class:`LayerKVCache` of earlier positions, extended here) or,
        when ``cross``, attention over ``memory`` (``cache``: a :class:`CrossKV` holding its keys and values once
        computed). ``bias_BHTK`` (any broadcastable leading dims) is added to the scores."""
        B, T, _ = x_BTD.shape
        q_BHTDk = self._heads(x_BTD, self.w_q)
        if self.cross:
            if cache is not None and cache.k_BHKDk is not None:
                k_BHKDk, v_BHKDk = cache.k_BHKDk, cache.v_BHKDk
            else:
                k_BHKDk, v_BHKDk = self.keys_values(memory_BSD)
                if cache is not None:
                    cache.k_BHKDk, cache.v_BHKDk = k_BHKDk, v_BHKDk
        else:
            k_BHKDk, v_BHKDk = self.keys_values(x_BTD)
            if cache is not None:
                k_BHKDk, v_BHKDk = cache.append(k_BHKDk, v_BHKDk)
        mask = None if bias_BHTK is None else bias_BHTK.to(q_BHTDk.dtype)
        o_BHTDk = F.scaled_dot_product_attention(
            q_BHTDk, k_BHKDk, v_BHKDk, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=1.0
        )
        return F.linear(o_BHTDk.transpose(1, 2).reshape(B, T, -1), self.w_out)


class CrossKV:
    """One decoder block's cross-attention keys and values ``[B, H, S, Dk]``, computed from the encoder output at
    the first decoding step and reused by every later one."""

    def __init__(self) -> None:
        self.k_BHKDk: Tensor | None = None
        self.v_BHKDk: Tensor | None = None


class Seq2SeqCache:
    """The decoder's state across decoding steps: per block, the self-attention keys and values of the tokens
    decoded so far (:class:`LayerKVCache`) and the cross-attention keys and values (:class:`CrossKV`). ``len(cache)``
    is the number of decoder positions cached. One cache serves one encoder output."""

    def __init__(self, n_layers: int) -> None:
        self.self_attn = [LayerKVCache() for _ in range(n_layers)]
        self.cross = [CrossKV() for _ in range(n_layers)]

    def __len__(self) -> int:
        return self.self_attn[0].length if self.self_attn else 0


class FeedForwardSublayer(nn.Module):
    """``x + dropout(ffn(norm(x)))``; the FFN is a :class:`DenseFFN` or an :class:`MoE` (``(y, aux)`` either way)."""

    def __init__(self, ffn: nn.Module, d_model: int, norm_eps: float, dropout: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn
        self.dropout = float(dropout)

    def forward(self, x_BTD: Tensor, mask_BT: Tensor | None = None) -> tuple[Tensor, MoEAux | None]:
        kwargs = {}
        # Only a token-choice MoE takes a token mask (padding out of capacity and losses); expert choice has no
        # per-token decline, so padding competes for its slots, and a dense FFN treats every position alike.
        if mask_BT is not None and isinstance(self.ffn, MoE) and self.ffn.config.router == "topk":
            kwargs["mask"] = mask_BT
        y_BTD, aux = self.ffn(self.norm(x_BTD), **kwargs)
        return x_BTD + _drop(y_BTD, self.dropout, self.training), aux


def _drop(x: Tensor, p: float, training: bool) -> Tensor:
    # Skipped at p = 0 so a dropout-free model draws nothing from the RNG.
    return F.dropout(x, p, training) if p > 0 else x


class T5Block(nn.Module):
    """One block: self-attention, cross-attention (decoder), then one feed-forward sublayer, or two (a dense one and
    the MoE one) for ST-MoE's ``dense_before_moe``. Every sublayer is pre-norm with a residual add."""

    def __init__(self, config: Seq2SeqConfig, stack: str, index: int) -> None:
        super().__init__()
        c = config
        decoder = stack == "decoder"
        relative_bias = None
        if index == 0:
            relative_bias = RelativePositionBias(
                c.relative_attention_num_buckets, c.relative_attention_max_distance, c.n_heads,
                bidirectional=not decoder,
            )
        self.self_attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attn = T5Attention(c.d_model, c.n_heads, c.d_kv, c.init_scale, dropout=c.dropout,
                                     relative_bias=relative_bias)
        self.cross_attn_norm = RMSNorm(c.d_model, c.norm_eps) if decoder else None
        self.cross_attn = (
            T5Attention(c.d_model, c.n_heads, c.d_kv, c.init_scale, dropout=c.dropout, cross=True) if decoder else None
        )
        ffns = []
        for width in c.ffn_widths(stack, index):
            ffn = (MoE(c.moe(stack)) if width is None
                   else DenseFFN(c.d_model, width, c.activation, init_scale=c.init_scale, dropout=c.dropout))
            ffns.append(FeedForwardSublayer(ffn, c.d_model, c.norm_eps, c.dropout))
        self.ff = nn.ModuleList(ffns)
        self.dropout = float(c.dropout)

    def forward(
        self, x_BTD: Tensor, self_bias: Tensor | None, *, memory_BSD: Tensor | None = None,
        cross_bias: Tensor | None = None, mask_BT: Tensor | None = None, cache: LayerKVCache | None = None,
        cross_cache: CrossKV | None = None,
    ) -> tuple[Tensor, list[MoEAux]]:
        a_BTD = self.self_attn(self.self_attn_norm(x_BTD), self_bias, cache=cache)
        x_BTD = x_BTD + _drop(a_BTD, self.dropout, self.training)
        if self.cross_attn is not None:
            c_BTD = self.cross_attn(self.cross_attn_norm(x_BTD), cross_bias, memory_BSD=memory_BSD, cache=cross_cache)
            x_BTD = x_BTD + _drop(c_BTD, self.dropout, self.training)
        aux: list[MoEAux] = []
        for sub in self.ff:
            x_BTD, sub_aux = sub(x_BTD, mask_BT)
            if sub_aux is not None:
                aux.append(sub_aux)
        return x_BTD, aux


def _masked(bias: Tensor, allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``bias`` where ``allowed``, else the dtype's lowest value (not -inf: a row with nothing allowed stays finite,
    as in Hugging Face's masks)."""
    return bias.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks and a final RMS norm. The first block's self-attention owns the relative
    position bias table; the bias is computed once per call and every block adds it."""

    def __init__(self, config: Seq2SeqConfig, stack: str) -> None:
        super().__init__()
        self.stack = stack
        self.is_decoder = stack == "decoder"
        self.blocks = nn.ModuleList(T5Block(config, stack, i) for i in range(config.n_layers(stack)))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.dropout = float(config.dropout)

    @property
    def relative_bias(self) -> RelativePositionBias:
        return self.blocks[0].self_attn.relative_bias

    def forward(
        self, x_BTD: Tensor, *, key_mask_BK: Tensor | None = None, memory_BSD: Tensor | None = None,
        memory_mask_BS: Tensor | None = None, moe_mask_BT: Tensor | None = None, cache: Seq2SeqCache | None = None,
    ) -> tuple[Tensor, list[MoEAux]]:
        """``x`` embedded tokens. Encoder: ``key_mask_BK`` (True = real token) masks padding keys. Decoder: causal,
        over ``memory`` (the encoder output, its padding ``memory_mask_BS``); with ``cache`` the tokens continue the
        cached positions. ``moe_mask_BT`` keeps positions out of the MoE layers' capacity and losses."""
        B, T, _ = x_BTD.shape
        dtype = x_BTD.dtype
        offset = 0 if cache is None else len(cache)
        K = offset + T
        bias_1HTK = self.relative_bias(T, K, offset)
        if self.is_decoder:
            # Key k is visible to the query at position offset + t when k <= offset + t.
            causal_TK = torch.ones(T, K, dtype=torch.bool, device=x_BTD.device).tril(offset)
            self_bias = _masked(bias_1HTK, causal_TK, dtype)
        elif key_mask_BK is not None:
            self_bias = _masked(bias_1HTK, key_mask_BK[:, None, None, :], dtype)
        else:
            self_bias = bias_1HTK.to(dtype)
        cross_bias = None
        if self.is_decoder and memory_mask_BS is not None:
            zeros_B1TS = torch.zeros(B, 1, T, memory_mask_BS.shape[1], dtype=dtype, device=x_BTD.device)
            cross_bias = _masked(zeros_B1TS, memory_mask_BS[:, None, None, :], dtype)
        h_BTD = _drop(x_BTD, self.dropout, self.training)
        aux: list[MoEAux] = []
        for i, block in enumerate(self.blocks):
            h_BTD, block_aux = block(
                h_BTD, self_bias, memory_BSD=memory_BSD, cross_bias=cross_bias, mask_BT=moe_mask_BT,
                cache=None if cache is None else cache.self_attn[i],
                cross_cache=None if cache is None else cache.cross[i],
            )
            aux.extend(block_aux)
        return _drop(self.final_norm(h_BTD), self.dropout, self.training), aux


@dataclass
class Seq2SeqOutput:
    """What ``Seq2SeqLM.forward`` returns.

    Attributes:
        logits_BTV: next-token logits of the decoder positions.
        encoder_aux: one :class:`MoEAux` per encoder MoE layer, in order (empty for a dense encoder).
        decoder_aux: the same for the decoder.
        loss: ``ce_loss + c_B * load_balancing_loss + c_z * z_loss`` (float32) when labels were given, else None.
        ce_loss: mean cross-entropy over the target tokens whose label is not -100 (float32).
        load_balancing_loss: mean over all MoE layers of both stacks of L_B (0 without MoE).
        z_loss: mean over all MoE layers of both stacks of L_Z (0 without MoE).
    """

    logits_BTV: Tensor
    encoder_aux: list[MoEAux] = field(default_factory=list)
    decoder_aux: list[MoEAux] = field(default_factory=list)
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    load_balancing_loss: Tensor | None = None
    z_loss: Tensor | None = None

    @property
    def aux(self) -> list[MoEAux]:
        """Every MoE layer's aux, encoder first (what the trainer logs, as for :class:`~moekit.models.LMOutput`)."""
        return [*self.encoder_aux, *self.decoder_aux]


class Seq2SeqLM(nn.Module):
    """The T5 v1.1 / Switch / ST-MoE encoder-decoder (see the module docstring).

    ``model(input_ids_BS, labels_BT)`` trains (decoder inputs are the labels shifted right after
    ``decoder_start_token_id``); :meth:`generate` decodes with a cache. Parameters: ``embed`` (shared by both stacks'
    inputs), ``encoder``, ``decoder`` (:class:`T5Stack`), ``head`` (None when ``tie_embeddings``).
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise ValueError(f"Seq2SeqLM expects a Seq2SeqConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        # Mesh-TF / T5 embeddings are N(0, 1): the RMS norms that follow make their scale irrelevant, and the tied
        # head divides the decoder output by sqrt(D) instead.
        nn.init.normal_(self.embed.weight, mean=0.0, std=1.0)
        self.encoder = T5Stack(c, "encoder")
        self.decoder = T5Stack(c, "decoder")
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        if self.head is not None:
            switch_init_(self.head.weight, fan_in=c.d_model, init_scale=1.0)

    @property
    def moe_layers(self) -> list[MoE]:
        """The MoE layers, encoder first, in block order (the order of ``Seq2SeqOutput.aux``)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as units, innermost first (``moekit.training.distributed``): each stack's relative
        position bias (owned by its first block but called by the stack before any block runs, so it needs its own
        all-gather), then every block."""
        return [self.encoder.relative_bias, self.decoder.relative_bias, *self.encoder.blocks, *self.decoder.blocks]

    def shift_right(self, labels_BT: Tensor) -> Tensor:
        """Decoder inputs for teacher forcing: ``decoder_start_token_id`` then the labels but the last, with ignored
        labels (-100) replaced by ``pad_token_id`` (as T5 does)."""
        c = self.config
        start_B1 = torch.full_like(labels_BT[:, :1], c.decoder_start_token_id)
        shifted_BT = torch.cat([start_B1, labels_BT[:, :-1]], dim=1)
        return shifted_BT.masked_fill(shifted_BT == IGNORE_INDEX, c.pad_token_id)

    def encode(self, input_ids_BS: Tensor, attention_mask_BS: Tensor | None = None) -> tuple[Tensor, list[MoEAux]]:
        """The encoder output ``[B, S, D]`` and its MoE layers' aux. ``attention_mask_BS`` (1 / True = real token)
        masks padding out of attention and out of the MoE layers' capacity and losses."""
        if input_ids_BS.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids_BS.shape)}")
        mask_BS = _bool_mask(attention_mask_BS, input_ids_BS)
        return self.encoder(self.embed(input_ids_BS), key_mask_BK=mask_BS, moe_mask_BT=mask_BS)

    def decode(
        self, decoder_input_ids_BT: Tensor, encoder_BSD: Tensor, attention_mask_BS: Tensor | None = None, *,
        cache: Seq2SeqCache | None = None, moe_mask_BT: Tensor | None = None,
    ) -> tuple[Tensor, list[MoEAux]]:
        """Logits ``[B, T, V]`` of the decoder over ``encoder_BSD`` and its MoE layers' aux. With ``cache`` (a
        :meth:`new_cache`), the tokens continue the cached positions and their keys and values are added to it."""
        if decoder_input_ids_BT.dim() != 2:
            raise ValueError(f"decoder inputs must be [batch, seq], got shape {tuple(decoder_input_ids_BT.shape)}")
        mask_BS = _bool_mask(attention_mask_BS, encoder_BSD[..., 0])
        h_BTD, aux = self.decoder(
            self.embed(decoder_input_ids_BT), memory_BSD=encoder_BSD, memory_mask_BS=mask_BS, moe_mask_BT=moe_mask_BT,
            cache=cache,
        )
        if self.head is None:
            # T5 v1.0 / Mesh-TF: with the embedding as output layer, the decoder output is scaled by D ** -0.5.
            return F.linear(h_BTD * self.config.d_model**-0.5, self.embed.weight), aux
        return self.head(h_BTD), aux

    def forward(
        self, input_ids_BS: Tensor, labels_BT: Tensor | None = None, *, attention_mask_BS: Tensor | None = None,
        decoder_input_ids_BT: Tensor | None = None,
    ) -> Seq2SeqOutput:
        """Logits of the decoder inputs (``decoder_input_ids_BT``, or the labels shifted right) and, with
        ``labels_BT``, the losses. Label -100 marks a target to ignore: no loss, and no MoE capacity or aux loss."""
        c = self.config
        if decoder_input_ids_BT is None:
            if labels_BT is None:
                raise ValueError("Seq2SeqLM needs labels_BT or decoder_input_ids_BT")
            decoder_input_ids_BT = self.shift_right(labels_BT)
        if labels_BT is not None and labels_BT.shape != decoder_input_ids_BT.shape:
            raise ValueError(
                f"labels {tuple(labels_BT.shape)} and decoder inputs {tuple(decoder_input_ids_BT.shape)} differ"
            )
        encoder_BSD, encoder_aux = self.encode(input_ids_BS, attention_mask_BS)
        target_mask_BT = None if labels_BT is None else labels_BT != IGNORE_INDEX
        logits_BTV, decoder_aux = self.decode(
            decoder_input_ids_BT, encoder_BSD, attention_mask_BS, moe_mask_BT=target_mask_BT
        )
        out = Seq2SeqOutput(logits_BTV=logits_BTV, encoder_aux=encoder_aux, decoder_aux=decoder_aux)
        if labels_BT is None:
            return out
        # Float32 cross-entropy (the logsumexp of bf16 logits loses precision), mean over the real targets.
        out.ce_loss = F.cross_entropy(
            logits_BTV.float().reshape(-1, c.vocab_size), labels_BT.reshape(-1), ignore_index=IGNORE_INDEX
        )
        out.loss, out.load_balancing_loss, out.z_loss = model_loss(
            out.ce_loss, out.aux, c.load_balance_coef, c.z_loss_coef
        )
        return out

    def new_cache(self) -> Seq2SeqCache:
        """An empty decoder cache for incremental decoding (see :meth:`decode`)."""
        return Seq2SeqCache(len(self.decoder.blocks))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        attention_mask: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
    ) -> Tensor:
        """Decode up to ``max_new_tokens`` for the inputs (1-D ``[S]`` or ``[B, S]``; ``attention_mask`` for padded
        rows). The encoder runs once; the decoder runs one position per step with a cache (its earlier keys and
        values, and the cross-attention keys and values, are never recomputed). Temperature 0 is greedy decoding;
        otherwise sampling, from the ``top_k`` most likely tokens when given. With ``eos_token_id`` a row stops at
        that token (later positions hold ``pad_token_id``) and decoding ends when every row has stopped.

        Returns the decoder sequences, ``decoder_start_token_id`` first (as Hugging Face's ``generate``), with the
        input's rank."""
        if input_ids.dim() not in (1, 2) or input_ids.shape[-1] == 0:
            raise ValueError(f"inputs must be token ids [S] or [batch, S] with S >= 1, got {tuple(input_ids.shape)}")
        c = self.config
        ids_BS = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        mask_BS = None
        if attention_mask is not None:
            mask_BS = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        encoder_BSD, _ = self.encode(ids_BS, mask_BS)
        cache = self.new_cache()
        seq_BT = torch.full((ids_BS.shape[0], 1), c.decoder_start_token_id, dtype=ids_BS.dtype, device=ids_BS.device)
        step_BT = seq_BT
        done_B = torch.zeros(ids_BS.shape[0], dtype=torch.bool, device=ids_BS.device)
        for _ in range(max_new_tokens):
            logits_BV = self.decode(step_BT, encoder_BSD, mask_BS, cache=cache)[0][:, -1].float()
            if temperature <= 0:
                nxt_B = logits_BV.argmax(dim=-1)
            else:
                logits_BV = logits_BV / temperature
                if top_k is not None and top_k < logits_BV.shape[-1]:
                    kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
                nxt_B = torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=generator).squeeze(1)
            nxt_B = nxt_B.to(seq_BT.dtype)
            if eos_token_id is not None:
                nxt_B = nxt_B.masked_fill(done_B, c.pad_token_id)
                done_B |= nxt_B == eos_token_id
            step_BT = nxt_B[:, None]
            seq_BT = torch.cat([seq_BT, step_BT], dim=1)
            if eos_token_id is not None and bool(done_B.all()):
                break
        return seq_BT[0] if input_ids.dim() == 1 else seq_BT


def _bool_mask(mask: Tensor | None, like_BS: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != like_BS.shape:
        raise ValueError(f"attention_mask must have shape {tuple(like_BS.shape)}, got {tuple(mask.shape)}")
    return mask.to(torch.bool)
