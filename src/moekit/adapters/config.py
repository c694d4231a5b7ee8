"""Typed configs for the parameter-efficient adapters: (IA)3, LoRA, MoV and MoLoRA (docs/ALGORITHMS.md section 5).

One dataclass per adapter type, validated in ``__post_init__`` so a bad value fails when the config is
built, with a ``ValueError`` that names the field, the value and the rule. ``adapter_config_to_dict`` /
``adapter_config_from_dict`` are the JSON round trip that ``save_adapters`` / ``load_adapters`` rely on (named
apart from :func:`moekit.config.config_from_dict`, which builds any config dataclass from a TOML section).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from moekit.config import check_choice, check_number, check_positive_int
from moekit.errors import ConfigError

ROUTING_MODES = ("soft", "topk")
ROUTER_INPUTS = ("token", "sentence")


def _check_routing(num_experts: int, routing: Any, top_k: Any, router_input: Any) -> None:
    check_positive_int("num_experts", num_experts)
    check_choice("routing", routing, ROUTING_MODES)
    check_positive_int("top_k", top_k)
    if routing == "topk" and top_k > num_experts:
        raise ConfigError(f"top_k must be <= num_experts ({num_experts}) with routing='topk', got {top_k!r}")
    check_choice("router_input", router_input, ROUTER_INPUTS)


def _check_lora(r: Any, alpha: Any, dropout: Any) -> None:
    check_positive_int("r", r)
    check_number("alpha", alpha, low=0, low_open=True, expected="a positive number")
    check_number("dropout", dropout, low=0, high=1, high_open=True)


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
        _check_lora(self.r, self.alpha, self.dropout)


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
        _check_lora(self.r, self.alpha, self.dropout)


AdapterConfig = IA3Config | LoRAConfig | MoVConfig | MoLoRAConfig
CONFIG_TYPES: dict[str, type] = {c.kind: c for c in (IA3Config, LoRAConfig, MoVConfig, MoLoRAConfig)}


def adapter_config_to_dict(config: AdapterConfig) -> dict[str, Any]:
    """``{"adapter": kind, **fields}``: the JSON form stored beside saved adapter weights."""
    return {"adapter": config.kind, **dataclasses.asdict(config)}


def adapter_config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Inverse of :func:`adapter_config_to_dict`; unknown adapter types and unknown fields are errors."""
    data = dict(data)
    kind = data.pop("adapter", None)
    if kind not in CONFIG_TYPES:
        raise ConfigError(f"adapter must be one of {sorted(CONFIG_TYPES)}, got {kind!r}")
    cls = CONFIG_TYPES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {kind} config field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**data)
