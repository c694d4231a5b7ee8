"""Adafactor (Shazeer & Stern 2018) with ST-MoE update clipping, as used to train T5, Switch and ST-MoE.

Second moments of a matrix (or of each matrix of a stacked expert bank ``[E, D, F]``) are factored into row and
column means, so the optimizer state is O(D + F) per matrix instead of O(D * F). The update is clipped by its
RMS: ``U <- U / max(1, RMS(U) / d)`` (ST-MoE section 3.1; d = 1 default; d = 0.1 stabilises but hurts quality).

The step size is ``alpha_t = rho_t * s_t``. ``rho_t`` is the group's learning rate (the trainer's schedule), or
with ``relative_step`` the paper's relative step ``min(1e-2, 1 / sqrt(t))`` (``warmup_init``: ``min(1e-6 t,
1 / sqrt(t))``). ``s_t`` is 1, or with ``scale_parameter`` the parameter's own scale ``max(eps2, RMS(X_{t-1}))``
(paper section 8, T5's ``multiply_by_parameter_scale``): a weight then moves by a fraction of its size, whatever its
initialisation. Momentum (``beta1 > 0``) averages the scaled steps ``alpha_t U_t`` and weight decay is
``X <- X (1 - alpha_t wd)``, as Mesh TensorFlow's and Hugging Face transformers' implementations do (the test suite
follows transformers' trajectory to float precision).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Adafactor"]


class Adafactor(torch.optim.Optimizer):
    """Args:
    params: parameters or groups.
    lr: learning rate ``rho_t`` (set every step by the trainer's schedule); unused with ``relative_step``.
    update_clip_d: d of the update clipping.
    decay_rate: second-moment decay ``beta2_t = 1 - t^(-decay_rate)`` (0.8).
    beta1: momentum on the scaled, clipped update; 0 disables it (the T5 default, which saves memory).
    eps: added to squared gradients (1e-30, as in the paper).
    weight_decay: decoupled, multiplied by the step size ``alpha_t``.
    scale_parameter: multiply the step by ``max(eps2, RMS(parameter))``.
    relative_step: ``rho_t = min(1e-2, 1 / sqrt(t))`` instead of ``lr``.
    warmup_init: with ``relative_step``, ``rho_t = min(1e-6 t, 1 / sqrt(t))``.
    eps2: the floor of the parameter scale (1e-3).
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
        scale_parameter: bool = False,
        relative_step: bool = False,
        warmup_init: bool = False,
        eps2: float = 1e-3,
    ) -> None:
        if lr <= 0 or update_clip_d <= 0:
            raise ValueError(f"Adafactor needs lr > 0 and update_clip_d > 0, got lr={lr}, d={update_clip_d}")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor's warmup_init needs relative_step=True")
        defaults = dict(
            lr=lr,
            update_clip_d=update_clip_d,
            decay_rate=decay_rate,
            beta1=beta1,
            eps=eps,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            eps2=eps2,
        )
        super().__init__(params, defaults)
        # Parameters sharded over an expert-parallel group (id -> group), set by moekit.training.distributed: their
        # update clipping and parameter scale take the RMS over the whole [E, ...] stack, all ranks' slices, as in one
        # process.
        self.sharded: dict[int, object] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Torch's loading, plus the state of an Adafactor saved before the step-size options existed: its groups get
        the defaults, and its momentum, which then averaged unscaled updates, is multiplied by the group's learning
        rate at the save (the scale it is now kept at), so a resumed run does not take a step of the update's own
        size."""
        old = [i for i, g in enumerate(state_dict["param_groups"]) if "relative_step" not in g]
        super().load_state_dict(state_dict)
        for i in old:
            group = self.param_groups[i]
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                m = self.state.get(p, {}).get("exp_avg")
                if m is not None:
                    m.mul_(group["lr"])

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

    def _rms(self, p: Tensor, x: Tensor) -> Tensor:
        """RMS of ``x`` (shaped like ``p``), over the whole expert stack when ``p`` is an expert-parallel slice."""
        if id(p) in self.sharded:
            group_ = self.sharded[id(p)]
            sq = x.pow(2).sum()
            dist.all_reduce(sq, group=group_)
            return (sq / (x.numel() * dist.get_world_size(group_))).sqrt()
        return x.pow(2).mean().sqrt()

    def _step_size(self, p: Tensor, group: dict, t: float) -> Tensor | float:
        """``alpha_t = rho_t * s_t`` (see the module docstring)."""
        rho = group["lr"]
        if group["relative_step"]:
            rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
        if not group["scale_parameter"]:
            return rho
        return torch.clamp(self._rms(p, p.detach().float()), min=group["eps2"]) * rho

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
        alpha = self._step_size(p, group, t)  # from the parameter before this update
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
        u = u / torch.clamp(self._rms(p, u) / group["update_clip_d"], min=1.0)
        u = u * alpha
        if group["beta1"] > 0:
            m = state["exp_avg"]
            m.mul_(group["beta1"]).add_(u, alpha=1.0 - group["beta1"])
            u = m
        if group["weight_decay"] > 0:
            # X - (alpha wd) X rather than X * (1 - alpha wd): the factor 1 - 1e-6 would round in float32.
            p.sub_(p * (alpha * group["weight_decay"]))
        p.sub_(u.to(p.dtype))
