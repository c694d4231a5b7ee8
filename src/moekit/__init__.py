"""moekit: Mixture-of-Experts layers, models, training and analysis for PyTorch.

Importing moekit has no side effects: no threads are set, no files are read, nothing is downloaded. The layers
exported here load on first use (``moekit.MoE``, ``from moekit import MoE``), so ``import moekit.errors`` and the
``moekit`` command line's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["DenseFFN", "MoE", "MoEAux", "MoEConfig", "SoftMoE", "SoftMoEConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import moekit.layers

        return getattr(moekit.layers, name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
