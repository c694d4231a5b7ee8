"""Typed, validated configs for the MoE layers. Every bad value raises a ValueError naming the field and value."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moekit.config import check_choice, check_int, check_positive_int, check_unit_interval
from moekit.errors import ConfigError
from moekit.experts.activations import ACTIVATIONS
from moekit.routing.topk import ROUTER_DTYPES, SECOND_EXPERT_POLICIES

__all__ = ["MoEConfig", "SoftMoEConfig", "ROUTERS"]

ROUTERS = ("topk", "expert_choice")


@dataclass
class MoEConfig:
    """A sparse MoE feed-forward layer.

    Attributes:
        d_model: model width D.
        d_ff: hidden width F of each expert.
        num_experts: E.
        top_k: experts per token (token choice); ignored by expert choice.
        capacity_factor: CF. Token choice: ``C = max(min_capacity, ceil(CF * k * T / E))`` per group of T tokens;
            None is dropless. Expert choice: c, each expert takes ``ceil(T * c / E)`` tokens (must be set).
        activation: "relu", "gelu", "swiglu" or "geglu".
        router: "topk" (token choice) or "expert_choice".
        normalize_gates: renormalise the k gates to sum to 1; None means True for k > 1, False for k = 1.
        min_capacity: lower bound on C (token choice).
        jitter_eps: multiplicative router-input jitter during training (Switch uses 1e-2).
        init_scale: Switch init scale for router and experts (0.1).
        group_size: tokens per routing group; None routes all tokens of a call as one group.
        expert_dropout: dropout on the expert hidden activation.
        noisy_gating: Shazeer 2017 noisy top-k.
        batch_priority: batch-priority routing (non-causal).
        second_expert_policy: "all" or "random" (threshold ``second_expert_threshold``).
        second_expert_threshold: 0.2.
        router_dtype: "float32" (default) or "bfloat16" (only to reproduce Switch Table 2).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 1
    capacity_factor: float | None = 1.0
    activation: str = "gelu"
    router: str = "topk"
    normalize_gates: bool | None = None
    min_capacity: int = 4
    jitter_eps: float = 0.0
    init_scale: float = 0.1
    group_size: int | None = None
    expert_dropout: float = 0.0
    noisy_gating: bool = False
    batch_priority: bool = False
    second_expert_policy: str = "all"
    second_expert_threshold: float = 0.2
    router_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            check_positive_int(name, getattr(self, name))
        check_choice("router", self.router, ROUTERS)
        if self.router == "topk" and self.top_k > self.num_experts:
            raise ConfigError(f"top_k must be <= num_experts={self.num_experts}, got top_k={self.top_k}")
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)):
                raise ConfigError(f"capacity_factor must be a number or None, got {self.capacity_factor!r}")
            if not self.capacity_factor > 0:
                raise ConfigError(f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}")
            # inf would reach math.ceil in the capacity rule and fail there; dropless is spelled None.
            if not math.isfinite(self.capacity_factor):
                cf = self.capacity_factor
                raise ConfigError(f"capacity_factor must be finite (None for dropless), got {cf}")
            self.capacity_factor = float(self.capacity_factor)
        elif self.router == "expert_choice":
            raise ConfigError(
                "capacity_factor must be > 0 for router='expert_choice' (it sets tokens per expert), got None"
            )
        check_choice("activation", self.activation, sorted(ACTIVATIONS))
        check_int("min_capacity", self.min_capacity, 0)
        check_unit_interval("jitter_eps", self.jitter_eps)
        check_unit_interval("expert_dropout", self.expert_dropout)
        if not isinstance(self.init_scale, (int, float)) or not self.init_scale > 0:
            raise ConfigError(f"init_scale must be > 0, got {self.init_scale!r}")
        if self.group_size is not None:
            check_positive_int("group_size", self.group_size)
        check_choice("second_expert_policy", self.second_expert_policy, SECOND_EXPERT_POLICIES)
        if not self.second_expert_threshold > 0:
            raise ConfigError(f"second_expert_threshold must be > 0, got {self.second_expert_threshold!r}")
        check_choice("router_dtype", self.router_dtype, tuple(ROUTER_DTYPES))
        if self.router == "expert_choice" and (self.noisy_gating or self.batch_priority):
            raise ConfigError("noisy_gating and batch_priority apply to router='topk' only")

    @property
    def is_causal_safe(self) -> bool:
        """False for routing that looks across the whole group (expert choice, batch priority)."""
        return self.router == "topk" and not self.batch_priority


@dataclass
class SoftMoEConfig:
    """A Soft MoE layer (Puigcerver et al. 2023).

    Attributes:
        d_model: model width D.
        d_ff: hidden width of each expert.
        num_experts: E.
        slots_per_expert: P; E * P equal to the tokens per group gives dense-matched FLOPs.
        activation: expert activation.
        init_scale: Switch init scale for the experts.
        expert_dropout: dropout on the expert hidden activation.
    """

    d_model: int
    d_ff: int
    num_experts: int
    slots_per_expert: int = 1
    activation: str = "gelu"
    init_scale: float = 0.1
    expert_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "slots_per_expert"):
            check_positive_int(name, getattr(self, name))
        check_choice("activation", self.activation, sorted(ACTIVATIONS))
        check_unit_interval("expert_dropout", self.expert_dropout)
        if not isinstance(self.init_scale, (int, float)) or not self.init_scale > 0:
            raise ConfigError(f"init_scale must be > 0, got {self.init_scale!r}")
