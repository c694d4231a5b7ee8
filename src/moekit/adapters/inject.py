"""Injecting adapters into any ``torch.nn.Module``, counting what trains, and merging (IA)3/LoRA back.

Adapters attach to their target layer without replacing it: the adapter becomes a child
``moekit_adapter`` of the target ``nn.Linear`` and a forward hook applies it. The base model's parameter
names therefore do not change (``save_pretrained`` and existing checkpoints keep working) and merging
just edits the base weight and removes the hook. Everything but the adapters (and their routers) is frozen.
An expert bank gets one ``moekit_adapter`` for all its adapted projections and an instance-level forward that
runs them inside the bank's own math (:mod:`moekit.adapters.experts`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from moekit.adapters.config import AdapterConfig, IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig
from moekit.adapters.experts import BankAdapter, install_bank_adapter, merge_bank_adapter, mixture_kind
from moekit.adapters.ia3 import IA3Scaler, MoVScaler
from moekit.adapters.lora import LoRADelta, MoLoRADelta
from moekit.adapters.targets import join_name, linear_shape, resolve_sites, split_site
from moekit.errors import MoekitError

ADAPTER_ATTR = "moekit_adapter"


def _make_adapter(config: AdapterConfig, site_kind: str, d_in: int, d_out: int) -> nn.Module:
    width = d_out if site_kind == "scale_output" else d_in
    if isinstance(config, IA3Config):
        return IA3Scaler(width)
    if isinstance(config, MoVConfig):
        return MoVScaler(width, config.num_experts, config.routing, config.top_k, config.router_input)
    if isinstance(config, LoRAConfig):
        return LoRADelta(d_in, d_out, config.r, config.alpha, config.dropout)
    if isinstance(config, MoLoRAConfig):
        return MoLoRADelta(d_in, d_out, config.num_experts, config.r, config.alpha, config.routing,
                           config.top_k, config.router_input, config.dropout)
    raise ValueError(f"config must be IA3Config, LoRAConfig, MoVConfig or MoLoRAConfig, "
                     f"got {type(config).__name__}")


def _scale_input_hook(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, ADAPTER_ATTR)(args[0]), *args[1:])


def _scale_output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, ADAPTER_ATTR)(output)


def _lora_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, ADAPTER_ATTR)(args[0]).to(output.dtype)


def _remove_hooks(target: nn.Module) -> None:
    # Found by function identity rather than through a saved handle, so this also works on a deep copy of the
    # model (whose hook dicts are copies that a handle of the original would not reach).
    ours = (_scale_input_hook, _scale_output_hook, _lora_hook)
    for hooks in (target._forward_pre_hooks, target._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in ours]:
            del hooks[key]


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(site name, target layer, adapter)`` for every adapted layer, in model order."""
    for name, module in model.named_modules():
        adapter = getattr(module, ADAPTER_ATTR, None)
        if isinstance(adapter, nn.Module):
            yield name, module, adapter


def apply_adapters(model: nn.Module, config: AdapterConfig, target_modules: Any = None) -> nn.Module:
    """Injects ``config``'s adapters into ``model`` in place (and returns it); freezes every other parameter.

    ``target_modules`` defaults to the family's sites (BERT, RoBERTa, DistilBERT, T5, GPT-2, LLaMA, and the MoE
    decoders Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): keys, values and the FFN activation for (IA)3/MoV; q, k, v, o
    and the FFN projections for LoRA/MoLoRA, the expert banks' included. Expert banks (moekit's ``ExpertBank``,
    transformers' fused experts) are named like layers, e.g. ``target_modules=["experts"]``. See
    :func:`moekit.adapters.targets.normalise_targets` for the accepted forms. The adapted model computes
    exactly what the frozen model computes until the adapters train.
    """
    if any(True for _ in iter_adapters(model)):
        raise MoekitError("model already has moekit adapters; apply_adapters once per model "
                          "(merge_adapters or a fresh model to start again)")
    sites = resolve_sites(model, config.kind, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    bank_sites: dict[str, dict[str, str]] = {}
    for name, site_kind in sites.items():
        module_name, projection = split_site(name, modules)
        if projection is not None:
            bank_sites.setdefault(module_name, {})[projection] = site_kind
            continue
        target = modules[name]
        d_in, d_out, _ = linear_shape(target)
        weight = target.weight
        adapter = _make_adapter(config, site_kind, d_in, d_out).to(weight.device)
        for r in adapter.modules():
            if hasattr(r, "site_name"):
                r.site_name = name
        target.add_module(ADAPTER_ATTR, adapter)
        if site_kind == "scale_input":
            target.register_forward_pre_hook(_scale_input_hook)
        elif site_kind == "scale_output":
            target.register_forward_hook(_scale_output_hook)
        else:
            target.register_forward_hook(_lora_hook)
        adapter._moekit_site_kind = site_kind  # a plain attribute, never saved
        for p in adapter.parameters():
            p.requires_grad_(True)
    for bank_name, site_kinds in bank_sites.items():
        install_bank_adapter(modules[bank_name], bank_name, config, site_kinds)
    model._moekit_adapter_config = config
    model._moekit_adapter_sites = dict(sites)
    return model


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    return getattr(model, "_moekit_adapter_config", None)


def adapter_sites(model: nn.Module) -> dict[str, str]:
    """``{site name: site kind}`` of the adapters on ``model`` (empty when there are none); an expert bank's sites
    are ``<bank>.<projection>``."""
    out: dict[str, str] = {}
    for name, _, adapter in iter_adapters(model):
        if isinstance(adapter, BankAdapter):
            out.update({join_name(name, p): kind for p, kind in adapter.site_kinds.items()})
        else:
            out[name] = adapter._moekit_site_kind
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter and router tensors only, keyed ``<site name>.<parameter path>``."""
    out: dict[str, torch.Tensor] = {}
    for name, _, adapter in iter_adapters(model):
        for pname, p in adapter.named_parameters():
            out[join_name(name, pname)] = p
    return out


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """``{"trainable": n, "total": n, "fraction": trainable / total}`` over the model's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Folds (IA)3 and LoRA adapters into the base weights and removes them; returns ``model``.

    (IA)3 on an output: ``W <- diag(l) W`` and ``b <- l * b``; on an input: ``W <- W diag(l)``; LoRA:
    ``W <- W + (alpha / r) B A``; on an expert bank the same per expert (docs/ALGORITHMS.md 5.10). MoV and MoLoRA
    cannot be merged: their mixture depends on each input. The base parameters stay frozen after merging.
    """
    found = list(iter_adapters(model))
    for name, _, adapter in found:
        if isinstance(adapter, BankAdapter):
            kind = mixture_kind(adapter)
        else:
            kind = {MoVScaler: "MoV", MoLoRADelta: "MoLoRA"}.get(type(adapter))
        if kind is not None:
            raise MoekitError(f"cannot merge {kind} adapters (site {name!r}): the expert mixture is "
                              f"computed from each input by the router, so no single weight matrix equals "
                              f"it; keep the adapters unmerged")
    for _name, target, adapter in found:
        if isinstance(adapter, BankAdapter):
            merge_bank_adapter(target, adapter)
            continue
        _, _, transposed = linear_shape(target)
        weight = target.weight  # [O, I] for nn.Linear, [I, O] for Conv1D
        bias = getattr(target, "bias", None)
        kind = adapter._moekit_site_kind
        if isinstance(adapter, IA3Scaler):
            vec_H = adapter.merged_vector().to(weight.dtype)
            if kind == "scale_output":
                weight.mul_(vec_H if transposed else vec_H[:, None])
                if bias is not None:
                    bias.mul_(vec_H.to(bias.dtype))
            else:
                weight.mul_(vec_H[:, None] if transposed else vec_H)
        else:
            delta_OI = adapter.merged_delta().to(weight.dtype)
            weight.add_(delta_OI.T if transposed else delta_OI)
        _remove_hooks(target)
        delattr(target, ADAPTER_ATTR)
    for attr in ("_moekit_adapter_config", "_moekit_adapter_sites"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
