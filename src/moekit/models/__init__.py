"""Models built from moekit layers: the decoder-only language model and the Vision Transformer classifier (dense,
MoE or Soft MoE FFNs)."""

from moekit.models.config import LMConfig
from moekit.models.flops import flop_matched_dense, flops_per_token, parameter_counts
from moekit.models.lm import LMOutput, TransformerLM
from moekit.models.vit import (
    ViT,
    ViTConfig,
    ViTOutput,
    vit_flop_matched_dense,
    vit_flops_per_image,
    vit_parameter_counts,
)

__all__ = [
    "LMConfig",
    "LMOutput",
    "TransformerLM",
    "ViT",
    "ViTConfig",
    "ViTOutput",
    "flop_matched_dense",
    "flops_per_token",
    "parameter_counts",
    "vit_flop_matched_dense",
    "vit_flops_per_image",
    "vit_parameter_counts",
]
