"""Adafactor (Shazeer & Stern 2018) with ST-MoE update clipping, as used to train T5, Switch and ST-MoE.

Second moments of a matrix (or of each matrix of a stacked expert bank ``[E, D, F]``) are factored into row and
column means, so the optimizer state is O(D + F) per matrix instead of O(D * F). The update is clipped by its
RMS:
``U <- U / max(1, RMS(U) / d)`` (ST-MoE section 3.1; d = 1 default; d = 0.1 stabilises but hurts quality). The
learning rate comes from the run's schedule (no relative step size), so the schedule is the same for both
optimizers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Adafactor"]


class Adafactor(torch.optim.Optimizer):
    """Args:
    params: parameters or groups.
    lr: learning rate (set every step by the trainer's schedule).
    update_clip_d: d of the update clipping.
    decay_rate: second-moment decay ``beta2_t = 1 - t^(-decay_rate)`` (0.8).
    beta1: momentum on the clipped update; 0 disables it (the T5 default, which saves memory).
    eps: added to squared gradients (1e-30, as in the paper).
    weight_decay: decoupled, multiplied by the learning rate.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        *,
        update_clip_d: float = 1.0,
        decay_rate: float = 0.8,
        beta1: float = 0.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or update_clip_d <= 0:
            raise ValueError(f"Adafactor needs lr > 0 and update_clip_d > 0, got lr={lr}, d={update_clip_d}")
        defaults = dict(
            lr=lr,
            update_clip_d=update_clip_d,
            decay_rate=decay_rate,
            beta1=beta1,
            eps=eps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        # Parameters sharded over an expert-parallel group (id -> group), set by moekit.training.distributed: their
        # update clipping takes the RMS over the whole [E, ...] stack, all ranks' slices, as in one process.
        self.sharded: dict[int, object] = {}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        g = p.grad.float()
        state = self.state[p]
        factored = g.dim() >= 2
        if not state:
            # step is a float32 tensor, like torch's AdamW, so it goes into safetensors with the rest.
            state["step"] = torch.zeros((), dtype=torch.float32)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(g.shape[:-1], dtype=torch.float32)
                state["exp_avg_sq_col"] = torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=torch.float32)
            else:
                state["exp_avg_sq"] = torch.zeros_like(g)
            if group["beta1"] > 0:
                state["exp_avg"] = torch.zeros_like(g)
        state["step"] += 1
        t = float(state["step"])
        beta2t = 1.0 - t ** (-group["decay_rate"])
        g2 = g * g + group["eps"]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(g2.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(g2.mean(dim=-2), alpha=1.0 - beta2t)
            # v_hat = row * col / mean(row): the rank-1 approximation of the second moment (paper, Alg. 4).
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            c_factor = col.rsqrt().unsqueeze(-2)
            u = g * r_factor * c_factor
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(g2, alpha=1.0 - beta2t)
            u = g * v.rsqrt()
        if id(p) in self.sharded:
            group_ = self.sharded[id(p)]
            sq = u.pow(2).sum()
            dist.all_reduce(sq, group=group_)
            rms = (sq / (u.numel() * dist.get_world_size(group_))).sqrt()
        else:
            rms = u.pow(2).mean().sqrt()
        u = u / torch.clamp(rms / group["update_clip_d"], min=1.0)
        if group["beta1"] > 0:
            m = state["exp_avg"]
            m.mul_(group["beta1"]).add_(u, alpha=1.0 - group["beta1"])
            u = m
        if group["weight_decay"] > 0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(u.to(p.dtype), alpha=-group["lr"])
