"""Transformer building blocks of the decoder LM: RMSNorm, rotary positions, causal attention, one pre-norm
block.

Shape legend: B batch, T sequence, D model width, H heads, Hd head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.aux import MoEAux
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.routing._init import switch_init_

__all__ = ["RMSNorm", "Rotary", "CausalSelfAttention", "Block"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` (Zhang & Sennrich 2019), computed in float32 because the mean of squares of a
    bf16
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
    """Rotary position embedding (Su et al. 2021), "rotate half" layout. Tables are buffers that are not
    saved:
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


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through ``F.scaled_dot_product_attention(is_causal=True)``; no biases."""

    def __init__(
        self, d_model: int, n_heads: int, max_seq_len: int, rope_base: float, init_scale: float
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.w_qkv = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.w_out = nn.Parameter(torch.empty(d_model, d_model))
        self.rotary = Rotary(self.head_dim, max_seq_len, rope_base)
        switch_init_(self.w_qkv, fan_in=d_model, init_scale=init_scale)
        switch_init_(self.w_out, fan_in=d_model, init_scale=init_scale)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        qkv = F.linear(x_BTD, self.w_qkv).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTHd, k_BHTHd, v_BHTHd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTHd = self.rotary(q_BHTHd)
        k_BHTHd = self.rotary(k_BHTHd)
        o_BHTHd = F.scaled_dot_product_attention(q_BHTHd, k_BHTHd, v_BHTHd, is_causal=True)
        return F.linear(o_BHTHd.transpose(1, 2).reshape(B, T, D), self.w_out)


class Block(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``; the FFN is dense or MoE.

    ``forward`` returns ``(out, aux)`` where ``aux`` is the MoE layer's :class:`MoEAux` or None for a dense
    FFN.
    A token that no expert processes (dropped for capacity) gets FFN output 0 and passes on through the
    residual.
    """

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
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = CausalSelfAttention(d_model, n_heads, max_seq_len, rope_base, init_scale)
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn
        self.dropout = float(dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, MoEAux | None]:
        a_BTD = self.attn(self.attn_norm(x_BTD))
        h_BTD = x_BTD + self._drop(a_BTD)
        aux = None
        if isinstance(self.ffn, MoE):
            f_BTD, aux = self.ffn(self.ffn_norm(h_BTD))
        else:
            f_BTD = self.ffn(self.ffn_norm(h_BTD))
        return h_BTD + self._drop(f_BTD), aux

    def _drop(self, x: Tensor) -> Tensor:
        # Skipped entirely at p = 0 so a dropout-free model draws nothing from the RNG.
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x


def dense_ffn(d_model: int, d_ff: int, activation: str, init_scale: float) -> DenseFFN:
    return DenseFFN(d_model, d_ff, activation, init_scale=init_scale)
