"""Layers: the routed layers (MoE with token or expert choice, Soft MoE) and the dense FFN, all returning
``(y, aux)``."""

from moekit.layers.aux import MoEAux, model_loss
from moekit.layers.config import MoEConfig, SoftMoEConfig
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.layers.soft_moe import SoftMoE
from moekit.layers.sparse import SparseFFN

__all__ = ["DenseFFN", "MoE", "MoEAux", "MoEConfig", "SoftMoE", "SoftMoEConfig", "SparseFFN", "model_loss"]
