"""Saving and loading adapters: ``adapters.safetensors`` (tensors) plus ``adapter_config.json``
(everything else).

Never pickle. The JSON records the adapter config and the exact site names, so ``load_adapters`` can
rebuild the adapters on a plain base model before loading the tensors. The directory is written to a
temporary sibling and renamed over the old one (:func:`moekit.atomic.atomic_dir`), so a crash never leaves half a
checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.adapters.config import adapter_config_from_dict, adapter_config_to_dict
from moekit.adapters.inject import adapter_config, adapter_sites, adapter_state_dict, apply_adapters
from moekit.adapters.targets import split_site
from moekit.atomic import atomic_dir
from moekit.errors import MoekitError

WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "moekit-adapters"


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes the adapter and router tensors of ``model`` and their config to ``directory``; returns the
    path."""
    config = adapter_config(model)
    sites = adapter_sites(model)
    if config is None or not sites:
        raise MoekitError("model has no moekit adapters to save (call apply_adapters first)")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    meta = {"format": FORMAT, "version": 1, "config": adapter_config_to_dict(config), "sites": sites,
            "shapes": {k: list(v.shape) for k, v in tensors.items()}}
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Loads adapters saved by :func:`save_adapters` into ``model`` (in place; also returned).

    ``model`` may already carry the same adapters, or be the plain base model (the saved config is
    applied first). A different adapter type, different sites or different tensor shapes are errors
    naming what differs.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: is {directory} a directory written by save_adapters?")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise MoekitError(f"{cfg_path} is not a moekit adapter config (format={meta.get('format')!r})")
    config = adapter_config_from_dict(meta["config"])
    saved_sites: dict[str, str] = meta["sites"]
    current = adapter_config(model)
    if current is None:
        by_kind: dict[str, list[str]] = {}
        for name, kind in saved_sites.items():
            by_kind.setdefault(kind, []).append(name)
        modules = dict(model.named_modules())
        # A linear site is a module; an expert-bank site is ``<bank>.<projection>`` of a bank module.
        missing = [n for n in saved_sites if split_site(n, modules)[0] not in modules]
        if missing:
            raise MoekitError(f"the model has no module(s) {missing[:5]} that the saved adapters in "
                              f"{directory} target: is it the same base model?")
        targets = by_kind if config.kind in ("ia3", "mov") else by_kind.get("lora", [])
        apply_adapters(model, config, targets)
    elif current != config:
        raise MoekitError(f"model carries {current} but {directory} holds {config}; load into a plain "
                          f"base model or one with the same adapters")
    sites = adapter_sites(model)
    if sites != saved_sites:
        diff = sorted(set(sites) ^ set(saved_sites))
        raise MoekitError(f"adapter sites differ from the saved ones in {directory}: {diff[:5]}")
    tensors = load_file(str(weights_path))
    params = adapter_state_dict(model)
    if set(tensors) != set(params):
        diff = sorted(set(tensors) ^ set(params))
        raise MoekitError(f"saved adapter tensors do not match the model's: {diff[:5]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise MoekitError(f"shape mismatch for {key}: saved {tuple(value.shape)}, model "
                              f"{tuple(params[key].shape)} (a different base model or adapter size?)")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))
    return model
