"""What a routed layer returns beside its output: its auxiliary losses and routing metrics.

Layers return this value instead of stashing losses in module globals, so a model sums the losses of its layers
explicitly and nothing leaks between forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.dispatch.plan import Plan
from moekit.routing.decision import AnyDecision, ExpertChoiceDecision, TokenChoiceDecision

__all__ = ["MoEAux", "model_loss"]

# The repr lists the load of each expert up to this many experts, and min / mean / max beyond.
_LIST_AT_MOST = 8


@dataclass(repr=False)
class MoEAux:
    """Auxiliary losses (float32 scalars with gradients) and detached metrics of one layer call.

    Attributes:
        load_balancing_loss: Switch eq. 4 (k choices), mean over routing groups; 0 for expert choice and Soft MoE,
            which are balanced by construction.
        z_loss: ST-MoE router z-loss; 0 for Soft MoE (no router logits over experts).
        tokens_per_expert: int64 ``[E]``, assignments each expert processed (after capacity), over all E experts
            of this call (also under expert parallelism).
        drop_fraction: share of routed assignments dropped for lack of capacity (token choice); for expert choice,
            the share of tokens no expert picked; 0 for Soft MoE.
        router_entropy: mean entropy (nats) of the router distribution per token (Soft MoE: of its combine
            weights over all slots).
        max_logit: the largest router logit (a precursor of instability in low precision).
        routing: the router's decision (:class:`~moekit.routing.TokenChoiceDecision`,
            :class:`~moekit.routing.ExpertChoiceDecision` or :class:`~moekit.routing.SoftRoutingDecision`), kept for
            analysis tools (routing traces).
        plan: the plan the dispatcher ran (for token choice ``plan.kept_mask_SK()`` says which choices got a
            capacity slot), so analysis reads what the layer did instead of re-planning it.
        routed_per_expert: int64 ``[E]``, the choices each expert received before capacity (token choice; equal to
            ``tokens_per_expert`` for expert choice and Soft MoE): the router's own load, whose max / mean is the
            "max violation" of loss-free balancing (loads after capacity cannot exceed C).
        mean_gate: (a property, computed when read, so no forward pays for it) float32 scalar, the mean gate (the
            combine weight that multiplies an expert's output) over the assignments that were processed: for token
            choice over the kept (token, choice) pairs (dropped, declined and padding choices excluded; with top-1
            and Switch's unnormalised gate this is the mean top-1 router probability), for expert choice over every
            (expert, token) pick; 0 when nothing was kept. None for Soft MoE, whose combine weights are over slots,
            not a gate per expert. The number of assignments it averages over is ``tokens_per_expert.sum()``.
    """

    load_balancing_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    drop_fraction: Tensor
    router_entropy: Tensor
    max_logit: Tensor
    routed_per_expert: Tensor
    routing: AnyDecision | None = None
    plan: Plan | None = None

    @property
    def mean_gate(self) -> Tensor | None:
        if self.routing is None or self.plan is None:
            return None
        return _mean_gate(self.routing, self.plan)

    @classmethod
    def from_routing(cls, decision: AnyDecision, plan: Plan) -> MoEAux:
        """The aux of one call from its decision (losses, router statistics) and its plan (loads, drops)."""
        return cls(
            load_balancing_loss=decision.load_balancing_loss(),
            z_loss=decision.z_loss(),
            tokens_per_expert=plan.tokens_per_expert_E.detach(),
            drop_fraction=torch.tensor(plan.drop_fraction, dtype=torch.float32),
            router_entropy=decision.router_entropy(),
            max_logit=decision.max_logit(),
            routing=decision,
            plan=plan,
            routed_per_expert=decision.router_load().detach(),
        )

    def metrics(self) -> dict[str, float | list[int]]:
        """Plain Python numbers for logging (``mean_gate`` only where the decision has gates)."""
        m: dict[str, float | list[int]] = {
            "load_balancing_loss": float(self.load_balancing_loss.detach()),
            "z_loss": float(self.z_loss.detach()),
            "tokens_per_expert": [int(t) for t in self.tokens_per_expert.tolist()],
            "drop_fraction": float(self.drop_fraction),
            "router_entropy": float(self.router_entropy),
            "max_logit": float(self.max_logit),
            "routed_per_expert": [int(t) for t in self.routed_per_expert.tolist()],
        }
        mean_gate = self.mean_gate
        if mean_gate is not None:
            m["mean_gate"] = float(mean_gate)
        return m

    def __repr__(self) -> str:
        # Summary numbers, never tensors: one line even for a 128-expert layer or a Soft MoE decision.
        m = self.metrics()
        load = m["tokens_per_expert"]
        if len(load) > _LIST_AT_MOST:
            load = f"[{len(load)} experts: min {min(load)}, mean {sum(load) / len(load):.4g}, max {max(load)}]"
        return (
            f"MoEAux(load_balancing_loss={m['load_balancing_loss']:.4g}, z_loss={m['z_loss']:.4g}, "
            f"tokens_per_expert={load}, drop_fraction={m['drop_fraction']:.4g}, "
            f"router_entropy={m['router_entropy']:.4g}, max_logit={m['max_logit']:.4g}, routing={self.routing!r})"
        )


def _mean_gate(decision: AnyDecision, plan: Plan) -> Tensor | None:
    """The mean combine weight over the processed assignments (see :attr:`MoEAux.mean_gate`), detached float32."""
    if isinstance(decision, TokenChoiceDecision):
        # plan_routing gives token choice a DispatchPlan, whose kept mask leaves out dropped and declined choices.
        # A masked sum, not boolean indexing: no host sync on an accelerator.
        kept_SK = plan.kept_mask_SK().float()  # type: ignore[attr-defined]
        gates_SK = decision.gates_SK.detach().float()
        return (gates_SK * kept_SK).sum() / kept_SK.sum().clamp_min(1.0)
    if isinstance(decision, ExpertChoiceDecision):
        gates_GEC = decision.gates_GEC.detach().float()
        return gates_GEC.sum() / max(gates_GEC.numel(), 1)
    return None


def model_loss(
    ce: Tensor, aux: list[MoEAux], load_balance_coef: float, z_loss_coef: float
) -> tuple[Tensor, Tensor, Tensor]:
    """A model's training loss from its task loss and its MoE layers' aux: ``(loss, L_B, L_Z)`` with
    ``loss = ce + c_B * mean_layers(L_B) + c_z * mean_layers(L_Z)`` (docs/ALGORITHMS.md section 2; the mean over
    MoE layers follows T5X). Float32; L_B and L_Z are 0 for a model without MoE layers."""
    zero = torch.zeros((), dtype=torch.float32, device=ce.device)
    lb = torch.stack([a.load_balancing_loss.float() for a in aux]).mean() if aux else zero
    z = torch.stack([a.z_loss.float() for a in aux]).mean() if aux else zero
    return ce + load_balance_coef * lb + z_loss_coef * z, lb, z
