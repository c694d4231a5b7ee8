"""Layers: MoE (token or expert choice), Soft MoE, and the dense FFN."""

from moekit.layers.aux import MoEAux
from moekit.layers.config import MoEConfig, SoftMoEConfig
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.layers.soft_moe import SoftMoE

__all__ = ["DenseFFN", "MoE", "MoEAux", "MoEConfig", "SoftMoE", "SoftMoEConfig"]
