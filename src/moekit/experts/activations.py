"""Activations for experts and dense FFNs.

``swiglu`` / ``geglu`` are gated (Shazeer 2020): ``act(x W_gate) * (x W_in)``. ``gelu_tanh`` / ``geglu_tanh`` use
GELU's tanh approximation ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``, which is what T5 v1.1, Switch
Transformers and Hugging Face's ``gelu_new`` compute (the exact erf form differs by up to ~1e-3), so their checkpoints
are reproduced exactly.
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
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),  # T5 v1.1 / Mesh-TF gelu ("gelu_new")
    "geglu_tanh": lambda t: F.gelu(t, approximate="tanh"),  # T5 v1.1's gated-gelu
}
GATED = frozenset({"swiglu", "geglu", "geglu_tanh"})


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
