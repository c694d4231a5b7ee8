"""Which modules of a model get adapters: built-in names for common Hugging Face families, or the user's list.

Three kinds of site (docs/ALGORITHMS.md section 5):
- ``scale_output``: (IA)3/MoV rescale a linear layer's output (attention keys and values);
- ``scale_input``: (IA)3/MoV rescale a linear layer's input, which for the FFN down projection is exactly the FFN
  activation after the nonlinearity;
- ``lora``: LoRA/MoLoRA add a low-rank update to a linear layer (attention q, k, v, o and both FFN projections).

Expert banks (moekit's ``ExpertBank``, transformers' fused experts modules: :mod:`moekit.adapters.experts`) are
sites too. A pattern naming the bank module (``"experts"``) gives every projection a LoRA / MoLoRA site, and (IA)3 /
MoV the bank's hidden activation (``scale_input`` of its out projection); a pattern naming one projection
(``"experts.w_out"``, ``"experts.gate_up_proj"``) gives that projection the site kind the pattern was listed under,
as for a linear layer. Bank site names are ``<bank module>.<projection>``.

A pattern matches a module name when it is the whole name, a dotted suffix of it (``"query"`` matches
``encoder.layer.0.attention.self.query``), or a regular expression matching the whole name.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from moekit.adapters.experts import bank_site_kinds, bank_spec
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
# transformers v5 MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): LLaMA-style attention, the fused experts
# module ``mlp.experts`` as a bank, Qwen2-MoE's shared expert and any dense MLP layers as linear layers. The routers
# (``mlp.gate``) and Qwen2-MoE's ``shared_expert_gate`` (D -> 1) stay frozen.
_MOE = {
    "scale_output": [r".*self_attn\.(k_proj|v_proj)"],
    "scale_input": [r".*mlp\.down_proj", r".*mlp\.shared_expert\.down_proj", r".*mlp\.experts"],
    "lora": [r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)", r".*mlp\.(gate_proj|up_proj|down_proj)",
             r".*mlp\.shared_expert\.(gate_proj|up_proj|down_proj)", r".*mlp\.experts"],
}
FAMILIES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "distilbert": _DISTILBERT,
    "t5": _T5, "mt5": _T5, "gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "mixtral": _MOE, "qwen2_moe": _MOE, "qwen3_moe": _MOE, "olmoe": _MOE,
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


def join_name(module_name: str, child: str) -> str:
    """``module.child``, or ``child`` for the model itself (name "")."""
    return f"{module_name}.{child}" if module_name else child


def _site_names(model: nn.Module) -> list[str]:
    """Every name a pattern can reach: linear layers, expert banks and ``<bank>.<projection>``."""
    names = []
    for name, module in model.named_modules():
        if is_adaptable(module):
            names.append(name)
        else:
            spec = bank_spec(module)
            if spec is not None:
                names.extend([name, *(join_name(name, p) for p in spec.shapes)])
    return [n for n in names if n]


def _candidates(model: nn.Module) -> list[str]:
    # Distinct last-two-component names of the linear layers and expert banks (and their projections): enough
    # for the user to write target_modules.
    seen: dict[str, None] = {}
    for name in _site_names(model):
        parts = [p for p in name.split(".") if not p.isdigit()]
        seen[".".join(parts[-2:]) or name] = None
    return list(seen)


def _family_patterns(model: nn.Module) -> dict[str, list[str]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    names = _site_names(model)
    for patterns in FAMILIES.values():
        if any(matches(p, n) for p in patterns["lora"] for n in names):
            return patterns
    cands = _candidates(model)
    raise MoekitError(
        f"cannot tell which modules to adapt in {type(model).__name__} (model_type={model_type!r}; known "
        f"families: {sorted(FAMILIES)}); pass target_modules, e.g. some of these linear layers or expert banks: "
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

    def add(name: str, site_kind: str) -> None:
        if name in sites and sites[name] != site_kind:
            raise MoekitError(f"module {name!r} matches both {sites[name]} and {site_kind} patterns")
        sites[name] = site_kind

    for name, module in model.named_modules():
        spec = None if is_adaptable(module) else bank_spec(module)
        if not name and spec is None:
            continue  # the model itself is a site only when it is an expert bank
        for site_kind, patterns in wanted.items():
            if spec is not None:
                # A bank: named as a whole it gets its natural sites; named by projection, the pattern's kind.
                if name and any(matches(p, name) for p in patterns):
                    for projection, bank_kind in bank_site_kinds(spec, kind).items():
                        add(join_name(name, projection), bank_kind)
                for projection in spec.shapes:
                    if any(matches(p, join_name(name, projection)) for p in patterns):
                        add(join_name(name, projection), site_kind)
            elif any(matches(p, name) for p in patterns):
                if not is_adaptable(module):
                    raise MoekitError(f"target module {name!r} is a {type(module).__name__}; adapters go on "
                                      f"nn.Linear (or Hugging Face Conv1D) layers and expert banks")
                add(name, site_kind)
    if not sites:
        cands = _candidates(model)
        params = [n for n, _ in model.named_parameters() if any(matches(p, n) for ps in wanted.values() for p in ps)]
        hint = ""
        if params:
            owner = type(model.get_submodule(params[0].rpartition(".")[0])).__name__
            hint = (f"; {params[0]!r} is a raw parameter of a {owner}, not an nn.Linear or an expert bank "
                    f"(moekit's own attention keeps w_qkv / w_out as raw parameters: adapt its experts)")
        raise MoekitError(f"no module of {type(model).__name__} matches target_modules {wanted}{hint}; "
                          f"linear layers and expert banks include {cands[:30]}{' ...' if len(cands) > 30 else ''}")
    return sites


def split_site(name: str, modules: dict[str, nn.Module]) -> tuple[str, str | None]:
    """``(module name, projection)`` of a site: ``(name, None)`` for a linear layer, ``(bank, projection)`` for a
    bank site ``<bank>.<projection>``."""
    if name in modules and is_adaptable(modules[name]):
        return name, None
    bank, _, projection = name.rpartition(".")
    return bank, projection
