"""Transformer building blocks: RMSNorm, rotary positions, multi-head attention (causal with rotary positions for
the decoder LM, bidirectional for the ViT), and the pre-norm block both models stack.

Shape legend: B batch, T sequence, D model width, H heads, Hd head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.init import switch_init_
from moekit.layers.aux import MoEAux
from moekit.layers.dense import DenseFFN
from moekit.layers.sparse import SparseFFN

__all__ = ["RMSNorm", "Rotary", "SelfAttention", "CausalSelfAttention", "PreNormBlock", "Block"]


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
    """Rotary position embedding (Su et al. 2021), "rotate half" layout. Tables are buffers that are not saved:
    they are a pure function of the config."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles_TH = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles_TH = torch.cat([angles_TH, angles_TH], dim=-1)
        self.register_buffer("cos_THd", angles_TH.cos(), persistent=False)
        self.register_buffer("sin_THd", angles_TH.sin(), persistent=False)

    def forward(self, x_BHTHd: Tensor) -> Tensor:
        T = x_BHTHd.shape[-2]
        cos = self.cos_THd[:T].to(x_BHTHd.dtype)
        sin = self.sin_THd[:T].to(x_BHTHd.dtype)
        x1, x2 = x_BHTHd.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x_BHTHd * cos + rotated * sin


class SelfAttention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``; no biases, Switch init. Bidirectional
    (every token sees every token: the ViT) unless ``causal``; ``rotary`` (a :class:`Rotary`) rotates queries and
    keys when given."""

    def __init__(
        self, d_model: int, n_heads: int, init_scale: float, *, causal: bool = False, rotary: Rotary | None = None
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.w_qkv = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.w_out = nn.Parameter(torch.empty(d_model, d_model))
        self.rotary = rotary
        switch_init_(self.w_qkv, fan_in=d_model, init_scale=init_scale)
        switch_init_(self.w_out, fan_in=d_model, init_scale=init_scale)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        qkv = F.linear(x_BTD, self.w_qkv).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTHd, k_BHTHd, v_BHTHd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.rotary is not None:
            q_BHTHd = self.rotary(q_BHTHd)
            k_BHTHd = self.rotary(k_BHTHd)
        o_BHTHd = F.scaled_dot_product_attention(q_BHTHd, k_BHTHd, v_BHTHd, is_causal=self.causal)
        return F.linear(o_BHTHd.transpose(1, 2).reshape(B, T, D), self.w_out)


class CausalSelfAttention(SelfAttention):
    """The decoder's attention: causal, with rotary positions."""

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, rope_base: float, init_scale: float) -> None:
        rotary = Rotary(d_model // n_heads, max_seq_len, rope_base)
        super().__init__(d_model, n_heads, init_scale, causal=True, rotary=rotary)


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

    def forward(self, x_BTD: Tensor, **ffn_kwargs) -> tuple[Tensor, MoEAux | None]:
        """``ffn_kwargs`` (e.g. an MoE layer's ``replay``) go to the FFN."""
        h_BTD = x_BTD + self._drop(self.attn(self.attn_norm(x_BTD)))
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
    ) -> None:
        super().__init__(
            RMSNorm(d_model, norm_eps),
            CausalSelfAttention(d_model, n_heads, max_seq_len, rope_base, init_scale),
            RMSNorm(d_model, norm_eps),
            ffn,
            dropout,
        )


def dense_ffn(d_model: int, d_ff: int, activation: str, init_scale: float) -> DenseFFN:
    return DenseFFN(d_model, d_ff, activation, init_scale=init_scale)
