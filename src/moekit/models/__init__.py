"""Models built from moekit layers: the decoder-only language model, the T5 / Switch encoder-decoder and the Vision
Transformer classifier (dense, MoE or Soft MoE FFNs)."""

from moekit.models.config import LMConfig
from moekit.models.flops import flop_matched_dense, flops_per_token, parameter_counts
from moekit.models.lm import LMOutput, TransformerLM
from moekit.models.seq2seq import Seq2SeqCache, Seq2SeqLM, Seq2SeqOutput
from moekit.models.seq2seq_config import Seq2SeqConfig
from moekit.models.seq2seq_flops import seq2seq_flop_matched_dense, seq2seq_flops_per_token, seq2seq_parameter_counts
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
    "Seq2SeqCache",
    "Seq2SeqConfig",
    "Seq2SeqLM",
    "Seq2SeqOutput",
    "TransformerLM",
    "ViT",
    "ViTConfig",
    "ViTOutput",
    "flop_matched_dense",
    "flops_per_token",
    "parameter_counts",
    "seq2seq_flop_matched_dense",
    "seq2seq_flops_per_token",
    "seq2seq_parameter_counts",
    "vit_flop_matched_dense",
    "vit_flops_per_image",
    "vit_parameter_counts",
]
