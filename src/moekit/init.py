"""Weight initialisers shared by routers, experts, dense FFNs and attention (Switch Transformer section 2.3): the one
place moekit initialises weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["switch_init_"]


@torch.no_grad()
def switch_init_(weight: Tensor, fan_in: int, init_scale: float) -> Tensor:
    """Truncated normal, mean 0, std = sqrt(init_scale / fan_in), cut at two standard deviations.

    Switch uses init_scale 0.1, ten times below the usual 1.0, because MoE training is sensitive to large initial
    weights (Switch Table 3). The cut at +-2 std is that of Mesh-TensorFlow's truncated normal.
    """
    std = math.sqrt(init_scale / fan_in)
    return torch.nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
