"""Transformer building blocks: RMSNorm, rotary positions, multi-head attention (causal with rotary positions for
the decoder LM, bidirectional for the ViT), and the pre-norm block both models stack.

Shape legend: B batch, T sequence, D model width, H heads (query heads; key/value heads are Hkv in the text),
Hd head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.init import switch_init_
from moekit.layers.aux import MoEAux
from moekit.layers.dense import DenseFFN
from moekit.layers.sparse import SparseFFN

__all__ = [
    "RMSNorm", "Rotary", "SelfAttention", "CausalSelfAttention", "KVCache", "LayerKVCache", "PreNormBlock", "Block",
]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` (Zhang & Sennrich 2019), computed in float32 because the mean of squares of a bf16
    tensor loses the small components; the result is cast back to the input dtype."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), "rotate half" layout (as Llama and the Hugging Face families).
    Tables are buffers that are not saved: they are a pure function of the config."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles_TH = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles_TH = torch.cat([angles_TH, angles_TH], dim=-1)
        self.register_buffer("cos_THd", angles_TH.cos(), persistent=False)
        self.register_buffer("sin_THd", angles_TH.sin(), persistent=False)

    def forward(self, x_BHTHd: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` as positions ``offset .. offset + T - 1`` (an offset: tokens after a KV cache's)."""
        T = x_BHTHd.shape[-2]
        if offset + T > self.cos_THd.shape[0]:
            raise ValueError(f"positions up to {offset + T} exceed max_seq_len={self.cos_THd.shape[0]}")
        cos = self.cos_THd[offset : offset + T].to(x_BHTHd.dtype)
        sin = self.sin_THd[offset : offset + T].to(x_BHTHd.dtype)
        x1, x2 = x_BHTHd.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x_BHTHd * cos + rotated * sin


class SelfAttention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``; Switch init. Bidirectional (every token
    sees every token: the ViT) unless ``causal``; ``rotary`` (a :class:`Rotary`) rotates queries and keys when given.

    Options for the decoder families moekit loads (Llama, Qwen, Mixtral, OLMoE): ``n_kv_heads`` < ``n_heads`` is
    grouped-query attention (query head h reads key/value head ``h // (n_heads / n_kv_heads)``); ``head_dim`` need
    not be ``d_model / n_heads``; ``qk_norm`` RMS-normalises queries and keys before the rotation, over each whole
    projection ("projection") or each head ("head"); ``qkv_bias`` / ``out_bias`` add biases.

    Parameters: ``w_qkv`` ``[(H + 2 Hkv) Hd, D]`` (queries, then keys, then values), ``w_out`` ``[D, H Hd]``, and
    when enabled ``b_qkv``, ``b_out``, ``q_norm``, ``k_norm``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        init_scale: float,
        *,
        causal: bool = False,
        rotary: Rotary | None = None,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: str = "none",
        qkv_bias: bool = False,
        out_bias: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.causal = causal
        H, Hkv, Hd = self.n_heads, self.n_kv_heads, self.head_dim
        self.w_qkv = nn.Parameter(torch.empty((H + 2 * Hkv) * Hd, d_model))
        self.w_out = nn.Parameter(torch.empty(d_model, H * Hd))
        self.b_qkv = nn.Parameter(torch.zeros((H + 2 * Hkv) * Hd)) if qkv_bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model)) if out_bias else None
        if qk_norm == "projection":
            self.q_norm, self.k_norm = RMSNorm(H * Hd, norm_eps), RMSNorm(Hkv * Hd, norm_eps)
        elif qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Hd, norm_eps), RMSNorm(Hd, norm_eps)
        elif qk_norm == "none":
            self.q_norm = self.k_norm = None
        else:
            raise ValueError(f"qk_norm must be one of 'none', 'projection', 'head', got {qk_norm!r}")
        self.qk_norm = qk_norm
        self.rotary = rotary
        switch_init_(self.w_qkv, fan_in=d_model, init_scale=init_scale)
        switch_init_(self.w_out, fan_in=H * Hd, init_scale=init_scale)

    def forward(self, x_BTD: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        """``cache``: the keys and values of earlier tokens (decoding); this call's are appended to it and the
        new tokens take the positions after them."""
        B, T, _ = x_BTD.shape
        H, Hkv, Hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = F.linear(x_BTD, self.w_qkv, self.b_qkv)
        q, k, v = qkv.split([H * Hd, Hkv * Hd, Hkv * Hd], dim=-1)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTHd = q.view(B, T, H, Hd).transpose(1, 2)
        k_BHTHd = k.view(B, T, Hkv, Hd).transpose(1, 2)
        v_BHTHd = v.view(B, T, Hkv, Hd).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHTHd, k_BHTHd = self.q_norm(q_BHTHd), self.k_norm(k_BHTHd)
        offset = 0 if cache is None else cache.length
        if self.rotary is not None:
            q_BHTHd = self.rotary(q_BHTHd, offset)
            k_BHTHd = self.rotary(k_BHTHd, offset)
        mask = None
        causal = self.causal
        if cache is not None:
            k_BHTHd, v_BHTHd = cache.append(k_BHTHd, v_BHTHd)
            if offset > 0 and self.causal:
                # New query i sits at position offset + i and may read keys 0 .. offset + i; one new token reads
                # them all, so it needs no mask.
                causal = False
                if T > 1:
                    mask = torch.ones(T, offset + T, dtype=torch.bool, device=x_BTD.device).tril(offset)
        o_BHTHd = F.scaled_dot_product_attention(
            q_BHTHd, k_BHTHd, v_BHTHd, attn_mask=mask, is_causal=causal, enable_gqa=Hkv != H
        )
        return F.linear(o_BHTHd.transpose(1, 2).reshape(B, T, H * Hd), self.w_out, self.b_out)


class CausalSelfAttention(SelfAttention):
    """The decoder's attention: causal, with rotary positions (options as :class:`SelfAttention`)."""

    def __init__(
        self, d_model: int, n_heads: int, max_seq_len: int, rope_base: float, init_scale: float, **options
    ) -> None:
        head_dim = options.get("head_dim") or d_model // n_heads
        rotary = Rotary(head_dim, max_seq_len, rope_base)
        super().__init__(d_model, n_heads, init_scale, causal=True, rotary=rotary, **options)


class LayerKVCache:
    """One attention layer's keys and values ``[B, Hkv, T, Hd]`` of the tokens decoded so far, in a buffer grown by
    doubling (so appending a token does not copy the whole history each step)."""

    def __init__(self) -> None:
        self.k_BHTHd: Tensor | None = None
        self.v_BHTHd: Tensor | None = None
        self.length = 0

    def append(self, k_BHTHd: Tensor, v_BHTHd: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys and values; return all of them (views of the buffer)."""
        T = k_BHTHd.shape[2]
        need = self.length + T
        if self.k_BHTHd is None or need > self.k_BHTHd.shape[2]:
            size = max(need, 2 * (0 if self.k_BHTHd is None else self.k_BHTHd.shape[2]), 16)
            k_new = k_BHTHd.new_empty(*k_BHTHd.shape[:2], size, k_BHTHd.shape[3])
            v_new = v_BHTHd.new_empty(*v_BHTHd.shape[:2], size, v_BHTHd.shape[3])
            if self.k_BHTHd is not None:
                k_new[:, :, : self.length] = self.k_BHTHd[:, :, : self.length]
                v_new[:, :, : self.length] = self.v_BHTHd[:, :, : self.length]
            self.k_BHTHd, self.v_BHTHd = k_new, v_new
        self.k_BHTHd[:, :, self.length : need] = k_BHTHd
        self.v_BHTHd[:, :, self.length : need] = v_BHTHd
        self.length = need
        return self.k_BHTHd[:, :, :need], self.v_BHTHd[:, :, :need]


class KVCache:
    """The keys and values of every attention layer of a decoder (``model(tokens, cache=cache)`` fills it; the next
    call's tokens continue the sequence). ``len(cache)`` is the number of tokens cached."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(n_layers)]

    def __len__(self) -> int:
        return self.layers[0].length if self.layers else 0


class PreNormBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(attn_norm(x)); out = h + ffn(ffn_norm(h))``; the FFN is dense, MoE or Soft
    MoE. Subclasses choose the norms and the attention.

    ``forward`` returns ``(out, aux)`` where ``aux`` is the FFN's own aux: a :class:`MoEAux` for a routed layer, None
    for a dense FFN (every FFN returns ``(y, aux)``, so the block never asks which kind it has).
    A token that no expert processes (dropped for capacity) gets FFN output 0 and passes on through the residual.
    """

    def __init__(self, attn_norm: nn.Module, attn: nn.Module, ffn_norm: nn.Module, ffn: nn.Module, dropout: float):
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.ffn_norm = ffn_norm
        self.ffn = ffn
        self.dropout = float(dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, SparseFFN)

    def forward(
        self, x_BTD: Tensor, cache: LayerKVCache | None = None, **ffn_kwargs
    ) -> tuple[Tensor, MoEAux | None]:
        """``cache`` goes to the attention (decoding with a KV cache); ``ffn_kwargs`` (e.g. an MoE layer's
        ``replay``) to the FFN."""
        a_BTD = self.attn(self.attn_norm(x_BTD)) if cache is None else self.attn(self.attn_norm(x_BTD), cache)
        h_BTD = x_BTD + self._drop(a_BTD)
        f_BTD, aux = self.ffn(self.ffn_norm(h_BTD), **ffn_kwargs)
        return h_BTD + self._drop(f_BTD), aux

    def _drop(self, x: Tensor) -> Tensor:
        # Skipped entirely at p = 0 so a dropout-free model draws nothing from the RNG.
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x


class Block(PreNormBlock):
    """The decoder LM's block: RMSNorm and causal rotary attention (see :class:`PreNormBlock`)."""

    def __init__(
        self,
        ffn: nn.Module,
        d_model: int,
        n_heads: int,
        max_seq_len: int,
        *,
        rope_base: float,
        init_scale: float,
        dropout: float,
        norm_eps: float,
        **attention_options,
    ) -> None:
        """``attention_options``: ``n_kv_heads``, ``head_dim``, ``qk_norm``, ``qkv_bias``, ``out_bias`` of
        :class:`SelfAttention`."""
        super().__init__(
            RMSNorm(d_model, norm_eps),
            CausalSelfAttention(
                d_model, n_heads, max_seq_len, rope_base, init_scale, norm_eps=norm_eps, **attention_options
            ),
            RMSNorm(d_model, norm_eps),
            ffn,
            dropout,
        )


def dense_ffn(d_model: int, d_ff: int, activation: str, init_scale: float) -> DenseFFN:
    return DenseFFN(d_model, d_ff, activation, init_scale=init_scale)
