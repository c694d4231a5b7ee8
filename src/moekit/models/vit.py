"""``ViT``: a Vision Transformer classifier whose FFNs are dense, token-choice MoE, expert-choice MoE or Soft MoE,
with its config, analytic parameter / FLOP counts and the FLOP-matched dense model.

Images are cut into non-overlapping square patches, each patch is projected to width D, and non-causal pre-norm
encoder blocks mix them; the Soft MoE paper (Puigcerver et al. 2023) puts its MoE in the last half of the blocks,
which is the default here. As ``TransformerLM``, the model returns every MoE layer's aux and, given labels, the loss
``CE + c_B * mean_layers(L_B) + c_z * mean_layers(L_Z)`` (docs/ALGORITHMS.md section 2).

Batch effects: token choice and expert choice route all tokens of a call (every image of the batch) as one group,
so with a finite capacity an image's output can depend on the other images of its batch. Soft MoE mixes tokens
within one image only (each image is its own group), so its outputs never do (docs/ALGORITHMS.md section 4). Under
expert parallelism a call is one rank's share of the batch; ``moe.group_size = num_tokens`` routes each image on its
own, so the routing does not depend on how the batch is split over ranks.

Shape legend: B batch, C channels (in ``images``) or classes (in ``logits_BC``), H/W image height/width,
N tokens per image, D model width, H heads, Hd head width, K patch values (C * patch_size**2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import (
    MAX_LAYERS,
    check_at_most,
    check_choice,
    check_non_negative,
    check_positive_int,
    check_positive_number,
    check_unit_interval,
    config_repr,
)
from moekit.errors import ConfigError
from moekit.experts.activations import ACTIVATIONS
from moekit.init import switch_init_
from moekit.layers.aux import MoEAux, model_loss
from moekit.layers.config import MoEConfig, SoftMoEConfig
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.layers.soft_moe import SoftMoE
from moekit.models.blocks import PreNormBlock, SelfAttention
from moekit.models.flops import _ffn_params, shared_expert_params

__all__ = [
    "ViTConfig",
    "ViT",
    "ViTOutput",
    "vit_parameter_counts",
    "vit_flops_per_image",
    "vit_flop_matched_dense",
    "POOLS",
]

POOLS = ("mean", "cls")


@dataclass
class ViTConfig:
    """A pre-norm Vision Transformer classifier.

    Attributes:
        num_classes: output classes.
        image_size: height and width of the (square) input images, in pixels.
        in_channels: image channels (1 for grey scale).
        patch_size: side of the square patches; must divide ``image_size``. Patches per image:
            ``(image_size / patch_size) ** 2``.
        d_model: width D.
        n_layers: number of encoder blocks.
        n_heads: attention heads (must divide ``d_model``).
        d_ff: hidden width of the dense FFNs.
        activation: dense FFN activation ("relu", "gelu", "swiglu", "geglu").
        moe: the MoE FFN (a token-choice or expert-choice ``MoEConfig``, or a ``SoftMoEConfig``), or None for a
            dense ViT. Expert choice and batch-priority routing are allowed: the encoder is not causal.
        moe_blocks: indices of the blocks holding the MoE FFN; None means the last half,
            ``range(n_layers // 2, n_layers)`` (the Soft MoE paper's ViT configs). For a dense model these are the
            blocks ``dense_d_ff_at_moe`` applies to. ``[]`` is allowed only for a dense model.
        dense_d_ff_at_moe: dense model only: hidden width of the FFNs of the ``moe_blocks`` (a FLOP-matched dense
            model of a top-k MoE uses ``k * moe.d_ff`` there); None means ``d_ff``.
        pool: "mean" (global average of the final tokens) or "cls" (a learned class token is prepended and its
            final state classifies).
        init_scale: Switch init scale of the attention and dense FFN weights (std = sqrt(s / fan_in)).
        dropout: residual dropout after attention and FFN.
        norm_eps: LayerNorm epsilon.
        load_balance_coef: c_B, weight of the mean load-balancing loss over MoE layers (Switch: 1e-2).
        z_loss_coef: c_z, weight of the mean router z-loss over MoE layers (ST-MoE: 1e-3).
    """

    num_classes: int = 10
    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    activation: str = "gelu"
    moe: MoEConfig | SoftMoEConfig | None = None
    moe_blocks: list[int] | None = None
    dense_d_ff_at_moe: int | None = None
    pool: str = "mean"
    init_scale: float = 0.1
    dropout: float = 0.0
    norm_eps: float = 1e-6
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3

    def __repr__(self) -> str:
        return config_repr(self)

    def __post_init__(self) -> None:
        for name in (
            "num_classes",
            "image_size",
            "in_channels",
            "patch_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
        ):
            check_positive_int(f"model.{name}", getattr(self, name))
        # The block layout (moe_blocks, its default the last half) is a list over the blocks.
        check_at_most("model.n_layers", self.n_layers, MAX_LAYERS, "MAX_LAYERS, beyond any trainable depth")
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                f"model.patch_size must divide model.image_size ({self.image_size}), got {self.patch_size}"
            )
        if self.d_model % self.n_heads != 0:
            raise ConfigError(f"model.n_heads must divide model.d_model ({self.d_model}), got {self.n_heads}")
        check_choice("model.activation", self.activation, sorted(ACTIVATIONS))
        check_choice("model.pool", self.pool, POOLS)
        if self.dense_d_ff_at_moe is not None:
            check_positive_int("model.dense_d_ff_at_moe", self.dense_d_ff_at_moe)
        check_unit_interval("model.dropout", self.dropout)
        for name in ("init_scale", "norm_eps"):
            check_positive_number(f"model.{name}", getattr(self, name))
        for name in ("load_balance_coef", "z_loss_coef"):
            check_non_negative(f"model.{name}", getattr(self, name))
        self._check_moe_blocks()
        self._check_moe()

    def _check_moe_blocks(self) -> None:
        if self.moe_blocks is None:
            return
        if isinstance(self.moe_blocks, (str, bytes)) or not isinstance(self.moe_blocks, (list, tuple)):
            raise ConfigError(f"model.moe_blocks must be a list of block indices or None, got {self.moe_blocks!r}")
        for i in self.moe_blocks:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layers:
                raise ConfigError(
                    f"model.moe_blocks entries must be block indices in [0, n_layers={self.n_layers}),"
                    f" got {i!r} in {self.moe_blocks!r}"
                )
        if len(set(self.moe_blocks)) != len(self.moe_blocks):
            raise ConfigError(f"model.moe_blocks must not repeat a block, got {self.moe_blocks!r}")
        self.moe_blocks = sorted(self.moe_blocks)

    def _check_moe(self) -> None:
        if self.moe is None:
            if self.dense_d_ff_at_moe is not None and not self._moe_positions():
                raise ConfigError("model.dense_d_ff_at_moe is set but model.moe_blocks is empty: it applies nowhere")
            return
        if not isinstance(self.moe, (MoEConfig, SoftMoEConfig)):
            raise ConfigError(f"model.moe must be a MoEConfig, a SoftMoEConfig or None, got {type(self.moe).__name__}")
        if self.moe.d_model != self.d_model:
            raise ConfigError(f"moe.d_model ({self.moe.d_model}) must equal model.d_model ({self.d_model})")
        if self.dense_d_ff_at_moe is not None:
            raise ConfigError("model.dense_d_ff_at_moe applies to dense models only (model.moe must be None)")
        if not self._moe_positions():
            raise ConfigError("model.moe_blocks is empty but model.moe is set: list at least one block, or drop moe")

    def _moe_positions(self) -> list[int]:
        if self.moe_blocks is None:
            return list(range(self.n_layers // 2, self.n_layers))
        return list(self.moe_blocks)

    @property
    def num_patches(self) -> int:
        """Patches per image: ``(image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per image seen by the encoder: the patches, plus the class token when ``pool == "cls"``."""
        return self.num_patches + (1 if self.pool == "cls" else 0)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: ``in_channels * patch_size ** 2``."""
        return self.in_channels * self.patch_size**2

    def moe_block_indices(self) -> list[int]:
        """Sorted indices of the blocks with an MoE FFN (empty for a dense model)."""
        return self._moe_positions() if self.moe is not None else []

    def dense_d_ff(self, index: int) -> int:
        """Hidden width of block ``index``'s dense FFN (``dense_d_ff_at_moe`` at the MoE positions of a dense
        model)."""
        if self.moe is None and self.dense_d_ff_at_moe is not None and index in self._moe_positions():
            return self.dense_d_ff_at_moe
        return self.d_ff


@dataclass
class ViTOutput:
    """What ``ViT.forward`` returns.

    Attributes:
        logits_BC: class logits (the autocast dtype under autocast).
        aux: one :class:`MoEAux` per MoE block, in block order (empty for a dense model).
        loss: total training loss (float32 scalar) when labels were given, else None.
        ce_loss: mean cross-entropy (float32) when labels were given.
        load_balancing_loss: mean over MoE layers of L_B (0 for a dense model, expert choice and Soft MoE).
        z_loss: mean over MoE layers of L_Z (0 for a dense model and Soft MoE).
        correct: int64 0-d tensor, how many argmax predictions equal the labels (when labels were given).
    """

    logits_BC: Tensor
    aux: list[MoEAux] = field(default_factory=list)
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    load_balancing_loss: Tensor | None = None
    z_loss: Tensor | None = None
    correct: Tensor | None = None


class EncoderBlock(PreNormBlock):
    """The ViT's block: LayerNorm and bidirectional attention (see :class:`~moekit.models.blocks.PreNormBlock`).

    The MoE FFN gets ``[B, N, D]``: token and expert choice flatten it into one routing group of B * N tokens;
    Soft MoE takes each image as one group.
    """

    def __init__(self, ffn: nn.Module, d_model: int, n_heads: int, *, init_scale: float, dropout: float, eps: float):
        super().__init__(
            nn.LayerNorm(d_model, eps=eps),
            SelfAttention(d_model, n_heads, init_scale),
            nn.LayerNorm(d_model, eps=eps),
            ffn,
            dropout,
        )


def patchify(images_BCHW: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, C * p * p]``: patches in row-major order (left to right, top to bottom), each
    flattened channel-major then row then column, i.e. the layout of a ``Conv2d(C, D, p, stride=p)`` weight
    ``[D, C, p, p]`` flattened, so the patch projection equals that convolution."""
    B, C, H, W = images_BCHW.shape
    p = patch_size
    x = images_BCHW.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


class ViT(nn.Module):
    """Vision Transformer classifier: patch projection + learned positions, pre-norm non-causal encoder blocks
    (block ``i`` holds the MoE FFN when ``i in config.moe_block_indices()``), a final LayerNorm, mean pooling or a
    class token, and a linear head. Call ``model(images, labels)`` to get a :class:`ViTOutput`.

    Attributes:
        patch_embed: ``Linear(C * p * p, D)`` over patches flattened as :func:`patchify` lays them out.
        pos_embed: ``[1, N, D]`` learned positions (the class token's first when ``pool == "cls"``).
        cls_token: ``[1, 1, D]`` when ``pool == "cls"``, else None.
        blocks: the :class:`EncoderBlock` list.
        norm: final LayerNorm.
        head: ``Linear(D, num_classes)``.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"ViT expects a ViTConfig, got {type(config).__name__}")
        self.config = c = config
        self.patch_embed = nn.Linear(c.patch_dim, c.d_model)
        # LeCun-normal patch projection (scale 1, as big_vision's ViT embedding): it sees raw, standardised pixels,
        # not a residual stream, so the 0.1 Switch scale would only shrink the signal relative to the positions.
        switch_init_(self.patch_embed.weight, fan_in=c.patch_dim, init_scale=1.0)
        nn.init.zeros_(self.patch_embed.bias)
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.d_model)) if c.pool == "cls" else None
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_tokens, c.d_model))
        nn.init.normal_(self.pos_embed, std=0.02)
        moe_blocks = set(c.moe_block_indices())
        blocks = []
        for i in range(c.n_layers):
            if i in moe_blocks:
                ffn: nn.Module = SoftMoE(c.moe) if isinstance(c.moe, SoftMoEConfig) else MoE(c.moe)
            else:
                ffn = DenseFFN(c.d_model, c.dense_d_ff(i), c.activation, init_scale=c.init_scale)
            blocks.append(
                EncoderBlock(ffn, c.d_model, c.n_heads, init_scale=c.init_scale, dropout=c.dropout, eps=c.norm_eps)
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.num_classes)
        # Small but non-zero (a zero head, as in the ViT paper, would stop every other gradient on the first step).
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def _check_images(self, images: Tensor) -> Tensor:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() == 3 and c.in_channels == 1:
            images = images.unsqueeze(1)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            alt = f" (or [B, {c.image_size}, {c.image_size}])" if c.in_channels == 1 else ""
            raise ValueError(
                f"images must be [B, {', '.join(map(str, expected))}]{alt}, got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point (scaled pixels), got dtype {images.dtype}")
        return images

    def forward(self, images: Tensor, labels: Tensor | None = None) -> ViTOutput:
        c = self.config
        images_BCHW = self._check_images(images)
        B = images_BCHW.shape[0]
        x_BND = self.patch_embed(patchify(images_BCHW, c.patch_size))
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(B, -1, -1).to(x_BND.dtype), x_BND], dim=1)
        x_BND = x_BND + self.pos_embed.to(x_BND.dtype)
        aux: list[MoEAux] = []
        for block in self.blocks:
            x_BND, block_aux = block(x_BND)
            if block_aux is not None:
                aux.append(block_aux)
        h_BND = self.norm(x_BND)
        pooled_BD = h_BND[:, 0] if c.pool == "cls" else h_BND.mean(dim=1)
        logits_BC = self.head(pooled_BD)
        out = ViTOutput(logits_BC=logits_BC, aux=aux)
        if labels is None:
            return out
        if labels.shape != (B,):
            raise ValueError(f"labels must be [B={B}], got shape {tuple(labels.shape)}")
        # Cross-entropy in float32: the logsumexp of bf16 logits loses precision.
        ce = F.cross_entropy(logits_BC.float(), labels)
        out.ce_loss = ce
        out.loss, out.load_balancing_loss, out.z_loss = model_loss(ce, aux, c.load_balance_coef, c.z_loss_coef)
        out.correct = (logits_BC.detach().argmax(dim=-1) == labels).sum()
        return out

    @property
    def moe_layers(self) -> list[nn.Module]:
        """The MoE / Soft MoE FFNs, in block order."""
        return [b.ffn for b in self.blocks if b.is_moe]


def _experts_per_token(config: ViTConfig) -> float:
    """Expert FFN passes per token, on average, that the FLOP and active-parameter counts charge (see
    :func:`vit_parameter_counts`)."""
    m = config.moe
    if isinstance(m, SoftMoEConfig):
        return m.num_experts * m.slots_per_expert / config.num_tokens
    if m.router == "expert_choice":
        return float(m.capacity_factor)
    return float(m.top_k)


def _router_params(config: ViTConfig) -> int:
    m, D = config.moe, config.d_model
    if isinstance(m, SoftMoEConfig):
        return D * m.num_experts * m.slots_per_expert + 1  # phi [D, E, P] + the learned logit scale
    return m.num_experts * D * (2 if m.router == "topk" and m.noisy_gating else 1)


def vit_parameter_counts(config: ViTConfig) -> dict[str, int]:
    """``{"total", "active", "expert"}``: parameters in all, used per token, and in all expert banks.

    Active counts, per MoE layer, the router plus the expert FFN passes a token costs on average: ``top_k``
    experts for token choice (capacity drops not subtracted); ``capacity_factor`` experts for expert choice (each
    expert takes ``ceil(S * c / E)`` of the S tokens, so c experts per token on average, the ceil ignored); and
    ``E * P / N`` experts for Soft MoE (an image's N tokens share E * P slots, each slot one pass through its
    expert). Fractional counts are rounded to the nearest integer.
    """
    c = config
    D = c.d_model
    # patch projection (+ bias) + positions + class token + final LayerNorm (weight, bias) + head (+ bias)
    total = c.patch_dim * D + D + c.num_tokens * D + (D if c.pool == "cls" else 0) + 2 * D
    total += D * c.num_classes + c.num_classes
    total += c.n_layers * (4 * D * D + 4 * D)  # attention q, k, v, o + two LayerNorms
    active = float(total)
    expert = 0
    moe_blocks = set(c.moe_block_indices())
    for i in range(c.n_layers):
        if i in moe_blocks:
            m = c.moe
            one = _ffn_params(D, m.d_ff, m.activation)
            router = _router_params(c)
            shared = shared_expert_params(m)
            expert += m.num_experts * one
            total += m.num_experts * one + router + shared
            active += _experts_per_token(c) * one + router + shared
        else:
            n = _ffn_params(D, c.dense_d_ff(i), c.activation)
            total += n
            active += n
    return {"total": total, "active": round(active), "expert": expert}


def vit_flops_per_image(config: ViTConfig) -> dict[str, int]:
    """``{"forward", "train"}`` FLOPs per image (a multiply-add counts 2; train = 3 x forward).

    Counted: the patch projection ``2 * num_patches * K * D``; per block the attention projections
    ``2 * N * 4 * D^2`` and scores ``2 * 2 * N^2 * D`` (q k^T and the weighted sum of v); the FFNs (dense:
    ``2 * N * ffn``; token / expert choice: the router ``2 * N * E * D`` plus ``N * experts_per_token`` expert
    passes, see :func:`vit_parameter_counts`; Soft MoE: the logits ``2 * N * D * E * P``, the dispatch and combine
    einsums ``2 * 2 * N * E * P * D`` and ``E * P`` expert passes); the head ``2 * D * num_classes``. Norms,
    softmaxes, biases and routing bookkeeping (sort, gather) are not matmuls and are not counted.
    """
    c = config
    D, N = c.d_model, c.num_tokens
    forward = 2 * c.num_patches * c.patch_dim * D + 2 * D * c.num_classes
    forward += c.n_layers * (2 * N * 4 * D * D + 2 * 2 * N * N * D)
    moe_blocks = set(c.moe_block_indices())
    for i in range(c.n_layers):
        if i not in moe_blocks:
            forward += 2 * N * _ffn_params(D, c.dense_d_ff(i), c.activation)
            continue
        m = c.moe
        one = _ffn_params(D, m.d_ff, m.activation)
        if isinstance(m, SoftMoEConfig):
            slots = m.num_experts * m.slots_per_expert
            forward += 2 * N * D * slots + 2 * 2 * N * slots * D + 2 * slots * one
        else:
            router = m.num_experts * D * (2 if m.router == "topk" and m.noisy_gating else 1)
            forward += 2 * N * (router + shared_expert_params(m)) + round(2 * N * _experts_per_token(c) * one)
    return {"forward": forward, "train": 3 * forward}


def vit_flop_matched_dense(config: ViTConfig) -> ViTConfig:
    """The dense ViT with the same FLOPs per image, routing aside (the router matmul; for Soft MoE also the
    dispatch and combine einsums): every MoE FFN becomes a dense FFN of hidden width ``experts_per_token * d_ff``:
    ``top_k * d_ff`` for token choice, ``capacity_factor * d_ff`` for expert choice, and ``E * P * d_ff / N`` for
    Soft MoE (``d_ff`` itself when the E * P slots equal the N tokens). Everything else is unchanged; the dense
    model keeps ``moe_blocks`` to know where the wider FFNs go. Raises ValueError when that width is not an
    integer or the experts' activation differs from ``model.activation``.
    """
    if config.moe is None:
        return dataclasses.replace(config)
    m = config.moe
    if m.activation != config.activation:
        raise ConfigError(
            f"vit_flop_matched_dense needs the experts' activation ({m.activation!r}) to equal model.activation "
            f"({config.activation!r})"
        )
    exact = _experts_per_token(config) * m.d_ff + getattr(m, "shared_hidden", 0)
    width = round(exact)
    if not math.isclose(exact, width, rel_tol=0, abs_tol=1e-9) or width < 1:
        raise ConfigError(
            f"the FLOP-matched dense FFN width would be {exact:g} (experts per token x moe.d_ff), not a positive"
            " integer; pick moe.d_ff (or the slots / capacity factor) so that it is"
        )
    return dataclasses.replace(
        config,
        moe=None,
        moe_blocks=config.moe_block_indices(),
        dense_d_ff_at_moe=None if width == config.d_ff else width,
    )
