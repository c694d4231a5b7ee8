"""Typed, validated configs for the MoE layers. Every bad value raises a ConfigError (a ValueError) naming the field
and value: booleans are real booleans, numbers finite, integers not booleans."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import (
    check_bool,
    check_choice,
    check_int,
    check_non_negative,
    check_number,
    check_positive_int,
    check_unit_interval,
    config_repr,
    is_finite_number,
)
from moekit.errors import ConfigError
from moekit.experts.activations import ACTIVATIONS
from moekit.routing.topk import ROUTER_DTYPES, SCORE_FUNCS, SECOND_EXPERT_POLICIES

__all__ = ["MoEConfig", "SoftMoEConfig", "ROUTERS"]

ROUTERS = ("topk", "expert_choice")
BALANCE_LOSSES = ("switch", "sequence", "global")


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
        eval_capacity_factor: the capacity factor in eval mode (token choice; Switch evaluates at 2.0 what it trains
            at 1.0-1.25); None: the training value.
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
        score_func: "softmax" (Switch, GShard, Mixtral, Qwen, OLMoE) or "sigmoid" (DeepSeek-V3: an independent
            score per expert; the gates are the chosen scores, renormalised over the k when ``normalize_gates``).
        routed_scaling_factor: multiplies the gates (after renormalisation), as DeepSeek-V2/V3 do (1.0: off).
        expert_bias: the router has a per-expert bias ``router.expert_bias`` ``[E]`` (float32 buffer, saved with the
            model) added to the scores for choosing experts only, never to the gates (loss-free balancing).
        bias_update_rate: u of loss-free balancing (Wang et al. 2024; DeepSeek-V3 uses 1e-3):
            :func:`moekit.routing.update_expert_bias` moves ``b_i`` by ``u * sign(mean load - load_i)`` after each
            optimizer step. 0 (default) is off; > 0 implies ``expert_bias``.
        num_expert_groups: experts split into this many equal groups (DeepSeek-V3's node-limited routing); each
            group is scored by the sum of its two best (biased) scores. 1: no groups.
        topk_groups: only the experts of the ``topk_groups`` best groups are eligible (default: all groups).
        num_shared_experts: always-active experts added to the routed output (DeepSeek, Qwen2-MoE), run as one dense
            FFN ``layer.shared_experts`` of hidden width ``num_shared_experts * shared_d_ff``.
        shared_d_ff: hidden width of each shared expert (None: ``d_ff``).
        shared_expert_gate: multiply the shared experts' output by ``sigmoid(x @ w)`` (Qwen2-MoE), ``w`` being
            ``layer.shared_expert_gate`` (D -> 1, no bias).
        balance_loss: "switch" (Switch eq. 4 per routing group), "sequence" (the same per sequence, i.e. per row
            of a ``[..., T, D]`` input: DeepSeek-V3's sequence-wise loss) or "global" (expert fractions counted
            over the whole call and every rank: Qwen's global-batch balance).
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
    score_func: str = "softmax"
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False
    bias_update_rate: float = 0.0
    num_expert_groups: int = 1
    topk_groups: int | None = None
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    balance_loss: str = "switch"
    eval_capacity_factor: float | None = None

    def __repr__(self) -> str:
        return config_repr(self)

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
            # inf would reach math.ceil in the capacity rule and fail there; dropless is spelled None. (An int
            # beyond 64 bits is no capacity either, and float() of it overflows.)
            if not is_finite_number(self.capacity_factor):
                cf = self.capacity_factor
                raise ConfigError(f"capacity_factor must be finite (None for dropless), got {cf}")
            self.capacity_factor = float(self.capacity_factor)
        elif self.router == "expert_choice":
            raise ConfigError(
                "capacity_factor must be > 0 for router='expert_choice' (it sets tokens per expert), got None"
            )
        check_choice("activation", self.activation, sorted(ACTIVATIONS))
        if self.eval_capacity_factor is not None:
            ecf = self.eval_capacity_factor
            if not is_finite_number(ecf) or not ecf > 0:
                raise ConfigError(f"eval_capacity_factor must be a finite number > 0 (or None), got {ecf!r}")
            if self.router != "topk" or self.capacity_factor is None:
                raise ConfigError("eval_capacity_factor applies to router='topk' with a capacity_factor (not dropless)")
            self.eval_capacity_factor = float(ecf)
        if self.normalize_gates is not None and not isinstance(self.normalize_gates, bool):
            # 3 or "false" would be read as true by the router's `if`: only a real bool (or None: by top_k) is one.
            raise ConfigError(f"normalize_gates must be true, false or none, got {self.normalize_gates!r}")
        check_int("min_capacity", self.min_capacity, 0)
        check_unit_interval("jitter_eps", self.jitter_eps)
        check_unit_interval("expert_dropout", self.expert_dropout)
        check_number("init_scale", self.init_scale, low=0, low_open=True, expected="> 0")
        if self.group_size is not None:
            check_positive_int("group_size", self.group_size)
        check_bool("noisy_gating", self.noisy_gating)
        check_bool("batch_priority", self.batch_priority)
        check_choice("second_expert_policy", self.second_expert_policy, SECOND_EXPERT_POLICIES)
        check_number("second_expert_threshold", self.second_expert_threshold, low=0, low_open=True, expected="> 0")
        check_choice("router_dtype", self.router_dtype, tuple(ROUTER_DTYPES))
        if self.router == "expert_choice" and (self.noisy_gating or self.batch_priority):
            raise ConfigError("noisy_gating and batch_priority apply to router='topk' only")
        self._check_router_family()

    def _check_router_family(self) -> None:
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_choice("balance_loss", self.balance_loss, BALANCE_LOSSES)
        if not is_finite_number(self.routed_scaling_factor) or not self.routed_scaling_factor > 0:
            raise ConfigError(f"routed_scaling_factor must be a finite number > 0, got {self.routed_scaling_factor!r}")
        check_non_negative("bias_update_rate", self.bias_update_rate)
        check_bool("expert_bias", self.expert_bias)
        if self.bias_update_rate > 0:
            self.expert_bias = True
        check_positive_int("num_expert_groups", self.num_expert_groups)
        G = self.num_expert_groups
        if self.topk_groups is None:
            self.topk_groups = G
        check_positive_int("topk_groups", self.topk_groups)
        if G > 1:
            if self.num_experts % G != 0 or self.num_experts // G < 2:
                raise ConfigError(
                    f"num_expert_groups must split num_experts={self.num_experts} into equal groups of at least 2 "
                    f"experts (a group is scored by its two best), got {G}"
                )
        if self.topk_groups > G:
            raise ConfigError(f"topk_groups must be <= num_expert_groups={G}, got {self.topk_groups}")
        if self.router == "topk" and self.top_k > self.topk_groups * (self.num_experts // G):
            raise ConfigError(
                f"top_k={self.top_k} exceeds the {self.topk_groups * (self.num_experts // G)} experts that "
                f"topk_groups={self.topk_groups} of {G} groups make eligible"
            )
        check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_d_ff is not None:
            check_positive_int("shared_d_ff", self.shared_d_ff)
        check_bool("shared_expert_gate", self.shared_expert_gate)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("shared_expert_gate needs num_shared_experts >= 1")
        if self.noisy_gating and self.score_func != "softmax":
            raise ConfigError("noisy_gating is defined for score_func='softmax' only")
        if self.router == "expert_choice" and (
            self.score_func != "softmax" or self.expert_bias or G > 1 or self.routed_scaling_factor != 1.0
            or self.balance_loss != "switch"
        ):
            raise ConfigError(
                "score_func, expert_bias / bias_update_rate, expert groups, routed_scaling_factor and balance_loss "
                "apply to router='topk' only"
            )

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the shared-experts FFN: ``num_shared_experts * shared_d_ff`` (0 without shared experts)."""
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

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
        router_scale_init: initial value of the router's learned logit scale (the logits are this times the cosine
            of a token and a slot parameter). 1.0 (the reference implementation's) leaves the logits within
            [-1, 1]: near-uniform dispatch and combine weights at small widths. ``sqrt(d_model)`` starts them at the
            magnitude of the paper's un-normalised logits ``X @ Phi`` for LayerNorm'd tokens (docs/ALGORITHMS.md
            section 4).
    """

    d_model: int
    d_ff: int
    num_experts: int
    slots_per_expert: int = 1
    activation: str = "gelu"
    init_scale: float = 0.1
    expert_dropout: float = 0.0
    router_scale_init: float = 1.0

    def __repr__(self) -> str:
        return config_repr(self)

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "slots_per_expert"):
            check_positive_int(name, getattr(self, name))
        check_choice("activation", self.activation, sorted(ACTIVATIONS))
        check_unit_interval("expert_dropout", self.expert_dropout)
        check_number("init_scale", self.init_scale, low=0, low_open=True, expected="> 0")
        check_number("router_scale_init", self.router_scale_init, low=0, low_open=True, expected="> 0")
        self.router_scale_init = float(self.router_scale_init)
