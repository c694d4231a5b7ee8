"""Activations for experts and dense FFNs.

``swiglu`` / ``geglu`` are gated (Shazeer 2020): ``act(x W_gate) * (x W_in)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": lambda t: F.gelu(t, approximate="none"),  # exact erf form
    "swiglu": F.silu,
    "geglu": lambda t: F.gelu(t, approximate="none"),
}
GATED = frozenset({"swiglu", "geglu"})


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
