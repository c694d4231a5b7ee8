"""Which modules of a model get adapters: built-in names for common Hugging Face families, or the user's list.

Three kinds of site (docs/ALGORITHMS.md section 5):
- ``scale_output``: (IA)3/MoV rescale a linear layer's output (attention keys and values);
- ``scale_input``: (IA)3/MoV rescale a linear layer's input, which for the FFN down projection is exactly the FFN
  activation after the nonlinearity;
- ``lora``: LoRA/MoLoRA add a low-rank update to a linear layer (attention q, k, v, o and both FFN projections).

A pattern matches a module name when it is the whole name, a dotted suffix of it (``"query"`` matches
``encoder.layer.0.attention.self.query``), or a regular expression matching the whole name.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from moekit.errors import MoekitError

SITE_KINDS = ("scale_output", "scale_input", "lora")

_BERT = {
    "scale_output": [r".*attention\.self\.(key|value)"],
    "scale_input": [r".*layer\.\d+\.output\.dense"],
    "lora": [r".*attention\.self\.(query|key|value)", r".*attention\.output\.dense", r".*intermediate\.dense",
             r".*layer\.\d+\.output\.dense"],
}
_DISTILBERT = {
    "scale_output": [r".*attention\.(k_lin|v_lin)"],
    "scale_input": [r".*ffn\.lin2"],
    "lora": [r".*attention\.(q_lin|k_lin|v_lin|out_lin)", r".*ffn\.(lin1|lin2)"],
}
_T5 = {
    "scale_output": [r".*(SelfAttention|EncDecAttention)\.(k|v)"],
    "scale_input": [r".*DenseReluDense\.wo"],
    "lora": [r".*(SelfAttention|EncDecAttention)\.(q|k|v|o)", r".*DenseReluDense\.(wi|wi_0|wi_1|wo)"],
}
# GPT-2 fuses q, k and v into one Conv1D (c_attn); (IA)3/MoV rescale all of its output, queries included.
_GPT2 = {
    "scale_output": [r".*attn\.c_attn"],
    "scale_input": [r".*mlp\.c_proj"],
    "lora": [r".*attn\.(c_attn|c_proj)", r".*mlp\.(c_fc|c_proj)"],
}
_LLAMA = {
    "scale_output": [r".*self_attn\.(k_proj|v_proj)"],
    "scale_input": [r".*mlp\.down_proj"],
    "lora": [r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)", r".*mlp\.(gate_proj|up_proj|down_proj)"],
}
FAMILIES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "distilbert": _DISTILBERT,
    "t5": _T5, "mt5": _T5, "gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
}


def is_adaptable(module: nn.Module) -> bool:
    """``nn.Linear`` or the transposed ``Conv1D`` of GPT-2 style Hugging Face models."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "weight")
                                             and module.weight.dim() == 2)


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, transposed)``; Conv1D stores its weight as ``[in, out]``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    d_in, d_out = module.weight.shape
    return int(d_in), int(d_out), True


def matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _candidates(model: nn.Module) -> list[str]:
    # Distinct last-two-component names of the linear layers: enough for the user to write target_modules.
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and is_adaptable(module):
            parts = [p for p in name.split(".") if not p.isdigit()]
            seen[".".join(parts[-2:]) or name] = None
    return list(seen)


def _family_patterns(model: nn.Module) -> dict[str, list[str]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    names = [n for n, m in model.named_modules() if is_adaptable(m)]
    for patterns in FAMILIES.values():
        if any(matches(p, n) for p in patterns["lora"] for n in names):
            return patterns
    cands = _candidates(model)
    raise MoekitError(
        f"cannot tell which modules to adapt in {type(model).__name__} (model_type={model_type!r}; known "
        f"families: {sorted(FAMILIES)}); pass target_modules, e.g. one of these linear layers: "
        f"{cands[:30]}{' ...' if len(cands) > 30 else ''}")


def normalise_targets(target_modules: Any, kind: str) -> dict[str, list[str]]:
    """User ``target_modules`` -> ``{site kind: patterns}`` for adapter ``kind``
    (``ia3``/``mov``/``lora``/...).

    A list means ``lora`` sites for LoRA/MoLoRA and ``scale_output`` sites for (IA)3/MoV; a dict names
    the site kinds explicitly (``{"scale_output": [...], "scale_input": [...]}``).
    """
    scale = kind in ("ia3", "mov")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if isinstance(target_modules, (list, tuple)):
        return {"scale_output" if scale else "lora": [str(p) for p in target_modules]}
    if isinstance(target_modules, dict):
        allowed = ("scale_output", "scale_input") if scale else ("lora",)
        bad = sorted(set(target_modules) - set(allowed))
        if bad:
            raise ValueError(f"target_modules keys for {kind} must be among {list(allowed)}, got {bad}")
        return {k: [str(p) for p in v] for k, v in target_modules.items()}
    raise ValueError(f"target_modules must be a list of names or a dict of site kind -> names, "
                     f"got {type(target_modules).__name__}")


def resolve_sites(model: nn.Module, kind: str, target_modules: Any = None) -> dict[str, str]:
    """``{module name: site kind}`` for every module that gets an adapter, in model order."""
    if target_modules is None:
        family = _family_patterns(model)
        keys = ("scale_output", "scale_input") if kind in ("ia3", "mov") else ("lora",)
        wanted = {k: family[k] for k in keys}
    else:
        wanted = normalise_targets(target_modules, kind)
    sites: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        for site_kind, patterns in wanted.items():
            if any(matches(p, name) for p in patterns):
                if not is_adaptable(module):
                    raise MoekitError(f"target module {name!r} is a {type(module).__name__}; adapters go on "
                                      f"nn.Linear (or Hugging Face Conv1D) layers")
                if name in sites and sites[name] != site_kind:
                    raise MoekitError(f"module {name!r} matches both {sites[name]} and {site_kind} patterns")
                sites[name] = site_kind
    if not sites:
        cands = _candidates(model)
        raise MoekitError(f"no module of {type(model).__name__} matches target_modules {wanted}; "
                          f"linear layers include {cands[:30]}{' ...' if len(cands) > 30 else ''}")
    return sites
