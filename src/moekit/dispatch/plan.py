"""The routing seam: any router's decision becomes a plan, and a dispatcher moves rows by that plan.

A layer runs ``router -> plan_routing -> dispatcher.dispatch -> experts -> dispatcher.combine`` whatever the router:

- a :class:`Plan` lays a call's tokens out as rows in expert order for the stacked expert bank (``dispatch``) and
  turns the bank's output rows back into one output per token (``combine``). Token choice and expert choice use
  gather plans (:class:`~moekit.dispatch.local.DispatchPlan`), Soft MoE a :class:`~moekit.dispatch.soft.SoftPlan`;
- a dispatcher decides where the rows run. :class:`LocalDispatcher` runs them here; the expert-parallel
  :class:`~moekit.dispatch.all_to_all.AllToAllDispatcher` sends each expert's block to the rank that owns it and
  back. Both wrap any plan, so every router works under expert parallelism.

Shape legend: S tokens of the call, D model width, E experts, A rows in expert order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from moekit.dispatch.local import plan_decision, plan_expert_choice
from moekit.dispatch.soft import plan_soft
from moekit.routing.decision import AnyDecision, ExpertChoiceDecision, SoftRoutingDecision, TokenChoiceDecision

__all__ = ["Dispatcher", "ExpertRows", "LocalDispatcher", "Plan", "plan_routing"]


@runtime_checkable
class Plan(Protocol):
    """Rows for the expert bank and back. ``tokens_per_expert_E`` counts the rows of each expert (int64 ``[E]``);
    ``rows_per_expert`` is that count when every expert has the same (the bank then runs one batched matmul)."""

    tokens_per_expert_E: Tensor
    rows_per_expert: int | None
    num_dropped: int
    capacity: int | None

    @property
    def drop_fraction(self) -> float: ...

    def dispatch(self, x_SD: Tensor) -> Tensor: ...

    def combine(self, y_AD: Tensor) -> Tensor: ...


def plan_routing(decision: AnyDecision, num_experts: int) -> Plan:
    """The plan of any router's decision (the one place that knows which plan each decision type gets)."""
    if isinstance(decision, TokenChoiceDecision):
        return plan_decision(decision, num_experts)
    if isinstance(decision, ExpertChoiceDecision):
        return plan_expert_choice(decision)
    if isinstance(decision, SoftRoutingDecision):
        return plan_soft(decision)
    raise TypeError(f"no plan for a routing decision of type {type(decision).__name__}")


@dataclass
class ExpertRows:
    """What a dispatcher hands the expert bank: rows grouped by (local) expert, and how many each expert has.

    Attributes:
        x_AD: the rows, expert by expert.
        tokens_per_expert_E: int64 rows per expert of this process.
        rows_per_expert: the common count when all experts have the same, else None.
        state: what the dispatcher needs to bring the outputs back (the plan, split sizes); the layer never reads it.
    """

    x_AD: Tensor
    tokens_per_expert_E: Tensor
    rows_per_expert: int | None
    state: Any


class Dispatcher(Protocol):
    """Moves a plan's rows to where the experts live and back."""

    def dispatch(self, x_SD: Tensor, plan: Plan) -> ExpertRows: ...

    def combine(self, y_AD: Tensor, rows: ExpertRows) -> Tensor: ...


class LocalDispatcher:
    """All experts live in this process: the plan's rows go straight to the bank."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_SD: Tensor, plan: Plan) -> ExpertRows:
        return ExpertRows(plan.dispatch(x_SD), plan.tokens_per_expert_E, plan.rows_per_expert, plan)

    def combine(self, y_AD: Tensor, rows: ExpertRows) -> Tensor:
        return rows.state.combine(y_AD)
