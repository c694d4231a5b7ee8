"""Dispatchers move tokens to experts and back; they never decide routing (see moekit.routing).

``plan_routing`` turns any router's decision into a :class:`Plan` (rows in expert order and back); a dispatcher
(:class:`LocalDispatcher`, or the expert-parallel ``moekit.dispatch.all_to_all.AllToAllDispatcher``) runs a plan.
"""

from moekit.dispatch.local import (
    DispatchPlan,
    combine,
    permute,
    plan_decision,
    plan_expert_choice,
    plan_token_choice,
    token_choice_capacity,
)
from moekit.dispatch.plan import Dispatcher, ExpertRows, LocalDispatcher, Plan, plan_routing
from moekit.dispatch.soft import SoftPlan, plan_soft

__all__ = [
    "DispatchPlan",
    "Dispatcher",
    "ExpertRows",
    "LocalDispatcher",
    "Plan",
    "SoftPlan",
    "combine",
    "permute",
    "plan_decision",
    "plan_expert_choice",
    "plan_routing",
    "plan_soft",
    "plan_token_choice",
    "token_choice_capacity",
]
