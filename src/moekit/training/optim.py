"""Build the optimizer a ``TrainConfig`` names, with weight decay only on matrices (not on norms' gains)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.training.adafactor import Adafactor
from moekit.training.config import TrainConfig

__all__ = ["build_optimizer"]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    if config.optimizer == "adafactor":
        return Adafactor(groups, lr=config.lr, update_clip_d=config.update_clip_d, beta1=config.beta1,
                         scale_parameter=config.scale_parameter, relative_step=config.relative_step)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")
