"""Dispatchers move tokens to experts and back; they never decide routing (see moekit.routing)."""

from moekit.dispatch.local import (
    DispatchPlan,
    LocalDispatcher,
    combine,
    permute,
    plan_decision,
    plan_token_choice,
    token_choice_capacity,
)

__all__ = [
    "DispatchPlan",
    "LocalDispatcher",
    "combine",
    "permute",
    "plan_decision",
    "plan_token_choice",
    "token_choice_capacity",
]
