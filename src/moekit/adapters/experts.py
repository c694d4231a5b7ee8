"""Expert banks as adapter sites: moekit's ``ExpertBank`` and Hugging Face transformers' fused expert modules.

A bank holds all experts' weights as 3-D tensors, so an adapter cannot hang on one ``nn.Linear`` per expert. Instead
the bank gets one child ``moekit_adapter`` (a :class:`BankAdapter`, holding one adapter per adapted projection) and an
instance-level ``forward`` (and ``forward_slots`` for moekit) that runs the bank's own math with the adapters in
it, on the same expert-sorted rows, with the same grouped matmul. The bank's parameters, their names and its class are
untouched; ``merge_adapters`` folds (IA)3 / LoRA into the 3-D weights and deletes the instance attributes, which
brings back the class's forward.

Two kinds of bank (:func:`bank_spec`):
- ``moekit``: :class:`moekit.experts.ExpertBank`, projections ``w_in`` / ``w_gate`` ``[E, D, F]`` and ``w_out``
  ``[E, F, D]`` used as ``x @ w[e]``; ``forward(x_AD, tokens_per_expert_E, rows_per_expert)`` and
  ``forward_slots(x_END)``.
- ``hf``: a transformers v5 experts module (``@use_experts_implementation``: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
  ...), projections ``gate_up_proj`` ``[E, 2F, D]`` (or ``up_proj`` when it has no gate) and ``down_proj``
  ``[E, D, F]`` used as ``F.linear(x, W[e])`` (``[E, I, O]`` when ``is_transposed``), optional per-expert biases,
  the module's own ``_apply_gate`` / ``act_fn`` and post-expert norm; ``forward(hidden_states, top_k_index,
  top_k_weights)``. The adapted forward sorts the (token, choice) pairs by expert, runs moekit's grouped matmul and
  sums each token's k weighted outputs in choice order, as transformers' ``grouped_mm`` implementation does, so it
  computes what the model computed before (whatever ``config._experts_implementation`` says) until the adapters train.

Site names are ``<bank module>.<projection>`` with the linear sites' kinds: ``lora`` on a projection, and
``scale_input`` / ``scale_output`` for (IA)3 / MoV (``scale_input`` of the out projection is the FFN hidden
activation).

Shape legend: T tokens, K choices per token, S = T * K (token, choice) pairs, A rows sorted by expert (A = S here),
E bank experts, D model width, F expert hidden width, I / O a projection's input / output width, ``x`` either ``A``
or ``E, N`` (slots).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.adapters.bank import BankIA3, BankLoRA, BankMoLoRA, BankMoV, BankRows
from moekit.adapters.config import AdapterConfig, IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig
from moekit.errors import MoekitError
from moekit.experts.activations import ACTIVATIONS
from moekit.experts.bank import ExpertBank

__all__ = ["BankAdapter", "BankSpec", "bank_spec", "install_bank_adapter", "merge_bank_adapter"]

ADAPTER_ATTR = "moekit_adapter"
_OVERRIDES = ("forward", "forward_slots")


@dataclass(frozen=True)
class BankSpec:
    """What a bank module looks like to the adapters.

    Attributes:
        kind: ``"moekit"`` or ``"hf"``.
        num_experts: E.
        shapes: ``{projection: (I, O)}`` in the order the bank runs them.
        out_projection: the projection whose input is the FFN hidden activation.
        transposed: ``{projection: True}`` when the tensor is stored ``[E, O, I]`` (transformers' default).
    """

    kind: str
    num_experts: int
    shapes: dict[str, tuple[int, int]]
    out_projection: str
    transposed: dict[str, bool]

    def weight_EIO(self, bank: nn.Module, projection: str) -> Tensor:
        """The projection's weight as an ``[E, I, O]`` view (in-place edits reach the parameter)."""
        w = getattr(bank, projection)
        return w.transpose(1, 2) if self.transposed[projection] else w

    def bias_EO(self, bank: nn.Module, projection: str) -> Tensor | None:
        if self.kind != "hf" or not getattr(bank, "has_bias", False):
            return None
        return getattr(bank, f"{projection}_bias", None)


def _is_3d_param(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


def bank_spec(module: nn.Module) -> BankSpec | None:
    """The :class:`BankSpec` of an expert bank (moekit ``ExpertBank`` or a transformers fused experts module), or
    None for any other module."""
    if isinstance(module, ExpertBank):
        E, D, Fh = module.w_in.shape
        shapes = {"w_in": (D, Fh)}
        if module.w_gate is not None:
            shapes["w_gate"] = (D, Fh)
        shapes["w_out"] = (Fh, D)
        return BankSpec("moekit", E, shapes, "w_out", dict.fromkeys(shapes, False))
    first = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    if not (_is_3d_param(module, first) and _is_3d_param(module, "down_proj")):
        return None
    transposed = not getattr(module, "is_transposed", False)  # transformers stores [E, O, I] unless is_transposed
    w_in, w_down = getattr(module, first), module.down_proj
    E = int(w_in.shape[0])
    shapes = {}
    for name, w in ((first, w_in), ("down_proj", w_down)):
        o, i = (w.shape[1], w.shape[2]) if transposed else (w.shape[2], w.shape[1])
        shapes[name] = (int(i), int(o))
    return BankSpec("hf", E, shapes, "down_proj", dict.fromkeys(shapes, transposed))


def bank_site_kinds(spec: BankSpec, adapter_kind: str) -> dict[str, str]:
    """The sites a bank named as a whole gets: every projection for LoRA / MoLoRA, the hidden activation (the input
    of the out projection) for (IA)3 / MoV."""
    if adapter_kind in ("ia3", "mov"):
        return {spec.out_projection: "scale_input"}
    return dict.fromkeys(spec.shapes, "lora")


class BankAdapter(nn.Module):
    """The adapters of one bank: ``sites[projection]`` is a :class:`BankLoRA` / :class:`BankMoLoRA` (kind
    ``lora``) or a :class:`BankIA3` / :class:`BankMoV` (``scale_input`` / ``scale_output``)."""

    def __init__(self, spec: BankSpec, config: AdapterConfig, site_kinds: dict[str, str]) -> None:
        super().__init__()
        E = spec.num_experts
        self.spec = spec
        self.sites = nn.ModuleDict()
        for projection, kind in site_kinds.items():
            d_in, d_out = spec.shapes[projection]
            width = d_out if kind == "scale_output" else d_in
            if isinstance(config, IA3Config):
                self.sites[projection] = BankIA3(E, width)
            elif isinstance(config, MoVConfig):
                self.sites[projection] = BankMoV(E, width, config.num_experts, config.routing, config.top_k)
            elif isinstance(config, LoRAConfig):
                self.sites[projection] = BankLoRA(E, d_in, d_out, config.r, config.alpha, config.dropout)
            elif isinstance(config, MoLoRAConfig):
                self.sites[projection] = BankMoLoRA(E, d_in, d_out, config.num_experts, config.r, config.alpha,
                                                    config.routing, config.top_k, config.dropout)
            else:
                raise ValueError(f"config must be IA3Config, LoRAConfig, MoVConfig or MoLoRAConfig, "
                                 f"got {type(config).__name__}")
        self.site_kinds = dict(site_kinds)  # a plain attribute, never saved

    def project(self, projection: str, x_xI: Tensor, w_EIO: Tensor, rows: BankRows,
                bias_EO: Tensor | None = None) -> Tensor:
        """``x @ w[e] (+ b[e])`` on the rows, with this projection's adapter (if any) applied as its kind says."""
        kind = self.site_kinds.get(projection)
        site = self.sites[projection] if kind is not None else None
        if kind == "scale_input":
            x_xI = site(x_xI, rows)
        y_xO = rows.matmul(x_xI, w_EIO)
        if bias_EO is not None:
            y_xO = y_xO + rows.per_expert(bias_EO.to(y_xO.dtype), y_xO)
        if kind == "lora":
            y_xO = y_xO + site(x_xI, rows).to(y_xO.dtype)
        elif kind == "scale_output":
            y_xO = site(y_xO, rows)
        return y_xO


# ---------------------------------------------------------------------------------------------------------------
# The adapted forwards, bound to the bank instance by install_bank_adapter.
# ---------------------------------------------------------------------------------------------------------------


def _moekit_ffn(bank: ExpertBank, x: Tensor, rows: BankRows) -> Tensor:
    """moekit's expert FFN (``experts/ffn.py: feed_forward``) with the adapters in it, in the same operation order,
    so it equals the frozen bank while the adapters are at their init (to float rounding: the frozen bank's fused
    path, ``experts/fused.py``, runs gate and up as one GEMM)."""
    adapter: BankAdapter = getattr(bank, ADAPTER_ATTR)
    w_in, w_gate, w_out = bank.w_in, bank.w_gate, bank.w_out
    if x.dtype != w_in.dtype:  # the grouped and batched products are not on autocast's lists (see feed_forward)
        w_in, w_out = w_in.to(x.dtype), w_out.to(x.dtype)
        w_gate = w_gate.to(x.dtype) if w_gate is not None else None
    act = ACTIVATIONS[bank.activation]
    h = adapter.project("w_in", x, w_in, rows)
    h = act(adapter.project("w_gate", x, w_gate, rows)) * h if w_gate is not None else act(h)
    if bank.dropout > 0:
        h = F.dropout(h, bank.dropout, bank.training)
    return adapter.project("w_out", h, w_out, rows)


def _moekit_forward(self: ExpertBank, x_AD: Tensor, tokens_per_expert_E: Tensor,
                    rows_per_expert: int | None = None) -> Tensor:
    if rows_per_expert is not None:
        E = self.w_in.shape[0]
        return self.forward_slots(x_AD.view(E, rows_per_expert, x_AD.shape[-1])).view(E * rows_per_expert, -1)
    return _moekit_ffn(self, x_AD, BankRows(tokens_per_expert_E, self.backend))


def _moekit_forward_slots(self: ExpertBank, x_END: Tensor) -> Tensor:
    return _moekit_ffn(self, x_END, BankRows(None))


def _hf_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """A transformers fused experts module's forward with the adapters in it (see the module docstring)."""
    if getattr(self, "_is_expert_parallel", False):
        raise MoekitError("moekit adapters on transformers experts do not support transformers' expert "
                          "parallelism; merge the adapters before sharding")
    adapter: BankAdapter = getattr(self, ADAPTER_ATTR)
    spec = adapter.spec
    first, out = list(spec.shapes)
    T, K = top_k_index.shape
    ids_S = top_k_index.reshape(-1)
    # The same sort as transformers' grouped_mm implementation: a CPU matmul may round a row differently depending
    # on where it sits in its block, so the same row order is what keeps the frozen output bit for bit.
    order_A = torch.sort(ids_S).indices
    counts_E = torch.bincount(ids_S, minlength=spec.num_experts)
    rows = BankRows(counts_E)
    w_first = spec.weight_EIO(self, first)
    x_AD = hidden_states[order_A // K].to(w_first.dtype)
    h_AF = adapter.project(first, x_AD, w_first, rows, spec.bias_EO(self, first))
    h_AF = self._apply_gate(h_AF) if getattr(self, "has_gate", True) else self.act_fn(h_AF)
    w_out = spec.weight_EIO(self, out)
    y_AD = adapter.project(out, h_AF.to(w_out.dtype), w_out, rows, spec.bias_EO(self, out))
    if getattr(self, "has_post_expert_norm", False):
        y_AD = self.post_expert_norm(y_AD)
    y_AD = y_AD * top_k_weights.reshape(-1)[order_A].unsqueeze(-1)
    # Back to (token, choice) order by a gather, then each token's K outputs summed in choice order.
    inverse_S = torch.empty_like(order_A)
    inverse_S[order_A] = torch.arange(order_A.shape[0], device=order_A.device)
    return y_AD.index_select(0, inverse_S).view(T, K, -1).sum(dim=1).to(hidden_states.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Installing, removing, merging.
# ---------------------------------------------------------------------------------------------------------------


def install_bank_adapter(bank: nn.Module, name: str, config: AdapterConfig, site_kinds: dict[str, str]) -> BankAdapter:
    """Gives ``bank`` (named ``name`` in its model) a :class:`BankAdapter` for ``site_kinds`` (``{projection:
    kind}``) and its adapted forward. The adapter parameters require grad; the bank's are left as they are."""
    spec = bank_spec(bank)
    if spec is None:
        raise MoekitError(f"{name!r} ({type(bank).__name__}) is not an expert bank")
    unknown = sorted(set(site_kinds) - set(spec.shapes))
    if unknown:
        raise MoekitError(f"expert bank {name!r} has no projection(s) {unknown}; it has {list(spec.shapes)}")
    if getattr(config, "router_input", "token") == "sentence":
        raise MoekitError(f"router_input='sentence' cannot route on expert bank {name!r}: its rows are tokens of "
                          f"many sequences; use router_input='token' (or target only linear layers)")
    if getattr(bank, "_is_expert_parallel", False):
        raise MoekitError(f"expert bank {name!r} is sharded by transformers' expert parallelism; moekit adapters "
                          f"need the whole bank")
    device = getattr(bank, spec.out_projection).device
    adapter = BankAdapter(spec, config, site_kinds).to(device)
    for projection, site in adapter.sites.items():
        for r in site.modules():
            if hasattr(r, "site_name"):
                r.site_name = f"{name}.{projection}" if name else projection
    bank.add_module(ADAPTER_ATTR, adapter)
    # Instance attributes shadow the class's methods (nn.Module looks forward up on the instance); a deep copy of
    # the model rebinds them to the copy.
    if spec.kind == "moekit":
        bank.forward = types.MethodType(_moekit_forward, bank)
        bank.forward_slots = types.MethodType(_moekit_forward_slots, bank)
    else:
        bank.forward = types.MethodType(_hf_forward, bank)
    for p in adapter.parameters():
        p.requires_grad_(True)
    return adapter


def remove_bank_adapter(bank: nn.Module) -> None:
    """Deletes the adapter and the instance forwards: the bank runs its class's forward again."""
    for attr in _OVERRIDES:
        bank.__dict__.pop(attr, None)
    delattr(bank, ADAPTER_ATTR)


@torch.no_grad()
def merge_bank_adapter(bank: nn.Module, adapter: BankAdapter) -> None:
    """Folds per-expert (IA)3 and LoRA into the bank's 3-D weights (and biases) and removes the adapter.

    LoRA: ``W[e] <- W[e] + (alpha / r) A[e] B[e]``; (IA)3 on an input: ``W[e] <- diag(l[e]) W[e]`` (rows of the
    ``[I, O]`` matrix); on an output: ``W[e] <- W[e] diag(l[e])`` and ``b[e] <- l[e] * b[e]``.
    """
    spec = adapter.spec
    for projection, kind in adapter.site_kinds.items():
        site = adapter.sites[projection]
        w_EIO = spec.weight_EIO(bank, projection)
        if isinstance(site, BankLoRA):
            w_EIO.add_(site.merged_delta().to(w_EIO.dtype))
        elif isinstance(site, BankIA3):
            vec_EH = site.merged_vector().to(w_EIO.dtype)
            if kind == "scale_input":
                w_EIO.mul_(vec_EH[:, :, None])
            else:
                w_EIO.mul_(vec_EH[:, None, :])
                bias_EO = spec.bias_EO(bank, projection)
                if bias_EO is not None:
                    bias_EO.mul_(vec_EH.to(bias_EO.dtype))
        else:
            raise MoekitError(f"cannot merge {type(site).__name__} on expert bank projection {projection!r}")
    remove_bank_adapter(bank)


def mixture_kind(adapter: BankAdapter) -> str | None:
    """``"MoV"`` / ``"MoLoRA"`` when the bank holds mixture adapters (which cannot be merged), else None."""
    for site in adapter.sites.values():
        if isinstance(site, BankMoV):
            return "MoV"
        if isinstance(site, BankMoLoRA):
            return "MoLoRA"
    return None
