"""Typed configs for the parameter-efficient adapters: (IA)3, LoRA, MoV and MoLoRA (ALGORITHMS.md section 5).

One dataclass per adapter type, validated in ``__post_init__`` so a bad value fails when the config is
built, with a ``ValueError`` that names the field, the value and the rule. ``config_from_dict`` /
``config_to_dict`` are the JSON round trip that ``save_adapters`` / ``load_adapters`` rely on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

ROUTING_MODES = ("soft", "topk")
ROUTER_INPUTS = ("token", "sentence")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_dropout(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")


def _check_routing(num_experts: int, routing: Any, top_k: Any, router_input: Any) -> None:
    _check_positive_int("num_experts", num_experts)
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    _check_positive_int("top_k", top_k)
    if routing == "topk" and top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}) with routing='topk', got {top_k!r}")
    if router_input not in ROUTER_INPUTS:
        raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {router_input!r}")


@dataclass
class IA3Config:
    """(IA)3: learned vectors (initialised to 1) rescale attention keys, values and the FFN activation."""

    kind: ClassVar[str] = "ia3"


@dataclass
class LoRAConfig:
    """LoRA: ``y = W0 x + (alpha / r) * B(A(dropout(x)))`` with B = 0 at init, on attention and FFN
    projections."""

    r: int = 4
    alpha: float = 16.0
    dropout: float = 0.0
    kind: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        _check_positive_float("alpha", self.alpha)
        _check_dropout(self.dropout)


@dataclass
class MoVConfig:
    """Mixture of (IA)3 vectors: a float32 router per site mixes ``num_experts`` vectors ("soft merging").

    ``routing="topk"`` keeps the ``top_k`` largest router probabilities (renormalised to sum to 1)
    instead of all; ``router_input="sentence"`` routes on the (masked) mean over the sequence of the
    site's activation instead of on each token. ``top_k`` is ignored with ``routing="soft"``.
    """

    num_experts: int = 10
    routing: str = "soft"
    top_k: int = 2
    router_input: str = "token"
    kind: ClassVar[str] = "mov"

    def __post_init__(self) -> None:
        _check_routing(self.num_experts, self.routing, self.top_k, self.router_input)


@dataclass
class MoLoRAConfig:
    """Mixture of LoRA experts: ``y = W0 x + (alpha / r) * sum_i s_i B_i(A_i x)`` with ``s = softmax(x @
    W_r)``.

    The defaults are the paper's published configuration (r = 4, alpha = 16, 10 experts).
    """

    num_experts: int = 10
    r: int = 4
    alpha: float = 16.0
    routing: str = "soft"
    top_k: int = 2
    router_input: str = "token"
    dropout: float = 0.0
    kind: ClassVar[str] = "molora"

    def __post_init__(self) -> None:
        _check_routing(self.num_experts, self.routing, self.top_k, self.router_input)
        _check_positive_int("r", self.r)
        _check_positive_float("alpha", self.alpha)
        _check_dropout(self.dropout)


AdapterConfig = IA3Config | LoRAConfig | MoVConfig | MoLoRAConfig
CONFIG_TYPES: dict[str, type] = {c.kind: c for c in (IA3Config, LoRAConfig, MoVConfig, MoLoRAConfig)}


def config_to_dict(config: AdapterConfig) -> dict[str, Any]:
    """``{"adapter": kind, **fields}``: the JSON form stored beside saved adapter weights."""
    return {"adapter": config.kind, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Inverse of :func:`config_to_dict`; unknown adapter types and unknown fields are errors."""
    data = dict(data)
    kind = data.pop("adapter", None)
    if kind not in CONFIG_TYPES:
        raise ValueError(f"adapter must be one of {sorted(CONFIG_TYPES)}, got {kind!r}")
    cls = CONFIG_TYPES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {kind} config field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**data)
