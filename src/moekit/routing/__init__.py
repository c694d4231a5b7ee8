"""Routers decide where tokens go and never move data (see moekit.dispatch for that)."""

from moekit.routing.balance import balancing_routers, reset_expert_load, update_expert_bias
from moekit.routing.decision import (
    AnyDecision,
    ExpertChoiceDecision,
    RoutingDecision,
    SoftRoutingDecision,
    TokenChoiceDecision,
)
from moekit.routing.expert_choice import ExpertChoiceRouter, expert_choice_capacity
from moekit.routing.losses import load_balancing_loss, router_z_loss
from moekit.routing.soft import SoftRouter
from moekit.routing.topk import TopKRouter, token_choice_capacity

__all__ = [
    "AnyDecision",
    "ExpertChoiceDecision",
    "ExpertChoiceRouter",
    "RoutingDecision",
    "SoftRouter",
    "SoftRoutingDecision",
    "TokenChoiceDecision",
    "TopKRouter",
    "balancing_routers",
    "expert_choice_capacity",
    "load_balancing_loss",
    "reset_expert_load",
    "router_z_loss",
    "token_choice_capacity",
    "update_expert_bias",
]
