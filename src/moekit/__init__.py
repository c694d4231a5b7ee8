"""moekit: Mixture-of-Experts layers, models, training and analysis for PyTorch.

Importing moekit has no side effects: no threads are set, no files are read, nothing is downloaded.
"""

from moekit.layers import DenseFFN, MoE, MoEAux, MoEConfig, SoftMoE, SoftMoEConfig

__version__ = "0.1.0"

__all__ = ["DenseFFN", "MoE", "MoEAux", "MoEConfig", "SoftMoE", "SoftMoEConfig", "__version__"]
