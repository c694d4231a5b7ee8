"""Sparse upcycling (Komatsuzaki et al. 2022): turn a trained dense :class:`~moekit.models.TransformerLM` into an
MoE model whose every expert starts as a copy of the dense FFN it replaces, so training continues from the dense
model's quality instead of from scratch.

Why the new model computes exactly the dense model's function at initialisation (docs/ALGORITHMS.md section 20):

- granularity 1: every expert of a layer is the dense FFN, and the top-k gates are renormalised to sum to 1, so
  ``sum_k gate_k * FFN(x) = FFN(x)`` whatever the router picks;
- granularity g > 1 (fine-grained upcycling, He et al. 2024): the F hidden units are cut into g contiguous chunks of
  F / g; the E experts are E / g copies of the g chunk-experts, each chunk's ``w_out`` multiplied by g. The router
  starts with one random row per copy, shared by that copy's g chunk-experts ("virtual groups"), so their scores tie
  and a top-k (k a multiple of g) takes whole copies; with the gates renormalised over the k, chunk j gets total
  weight ``sum_copies p_c / (g * sum p) = 1 / g`` and ``sum_j (1/g) * g * FFN_j(x) = FFN(x)`` (an FFN is a sum over
  its hidden units, and the activation acts on each unit alone).

Everything else (embeddings, attention, norms, the FFNs that stay dense) is copied exactly. The routing is dropless
by default (``capacity_factor`` None): a dropped token would lose its FFN output and break the identity.

Shape legend: D model width, F dense FFN hidden width, C copies (E / g), G granularity, E experts, f = F / G.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.layers.config import MoEConfig
from moekit.models.config import LMConfig
from moekit.models.lm import TransformerLM

__all__ = ["upcycle_config", "upcycle", "DEFAULT_ROUTER_INIT_SCALE"]

# Std of the router's entries at upcycling. Small, so the router starts close to uniform and learns its split from
# the data, yet large enough that the copies' logits differ by far more than float rounding (the ties inside a
# copy are exact, the gaps between copies are not).
DEFAULT_ROUTER_INIT_SCALE = 0.02


def upcycle_config(
    config: LMConfig,
    *,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    moe_every: int = 2,
    moe_offset: int = 1,
    capacity_factor: float | None = None,
    normalize_gates: bool = True,
    router_init_scale: float = DEFAULT_ROUTER_INIT_SCALE,
) -> LMConfig:
    """The MoE config of the upcycled model: ``config`` with ``moe`` set (``dataclasses.replace``, so every other
    field carries over) and the MoE positions ``i % moe_every == moe_offset``.

    Each expert has hidden width ``F / granularity`` where F is the dense FFN's width at the MoE positions. Raises a
    one-line :class:`ConfigError` for a source that is already MoE, E not a multiple of g, F not divisible by g, k
    not a multiple of g, gates that are not renormalised, or a layout whose dense FFN widths do not fit one MoE
    config. ``router_init_scale`` is checked here and used by :func:`upcycle`.
    """
    if not isinstance(config, LMConfig):
        raise ConfigError(f"upcycling needs an LMConfig, got {type(config).__name__}")
    if config.moe is not None:
        raise ConfigError("the source model is already MoE (model.moe is set): upcycling starts from a dense model")
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("granularity", granularity),
                        ("moe_every", moe_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"upcycle: {name} must be a positive integer, got {value!r}")
    if isinstance(router_init_scale, bool) or not isinstance(router_init_scale, (int, float)) \
            or not router_init_scale > 0:
        raise ConfigError(f"upcycle: router_init_scale must be a number > 0, got {router_init_scale!r}")
    g = granularity
    if num_experts % g != 0:
        raise ConfigError(
            f"upcycle: num_experts ({num_experts}) must be a multiple of granularity ({g}): the experts are "
            f"num_experts / granularity copies of the {g} chunks of the dense FFN"
        )
    if top_k % g != 0:
        raise ConfigError(
            f"upcycle: top_k ({top_k}) must be a multiple of granularity ({g}): a token must take whole copies "
            "(all g chunks of the dense FFN) for the upcycled layer to equal the dense one at initialisation"
        )
    if not normalize_gates:
        raise ConfigError(
            "upcycle: normalize_gates must be true: the k gates must sum to 1 for the copies of the dense FFN to "
            "add up to it (raw softmax gates would scale the FFN output by the chosen probability mass)"
        )
    if isinstance(moe_offset, bool) or not isinstance(moe_offset, int) or not 0 <= moe_offset < moe_every:
        raise ConfigError(f"upcycle: moe_offset must be an integer in [0, moe_every={moe_every}), got {moe_offset!r}")
    widths = [config.dense_d_ff(i) for i in range(config.n_layers)]
    # The blocks the MoE model will route in: the layout rule, less the blocks the source keeps dense.
    moe_positions = [i for i in range(config.n_layers) if i % moe_every == moe_offset and i not in config.dense_layers]
    if not moe_positions:
        raise ConfigError(
            f"upcycle: no block is MoE with n_layers={config.n_layers}, moe_every={moe_every}, moe_offset={moe_offset},"
            f" dense_layers={config.dense_layers}"
        )
    F = widths[moe_positions[0]]
    if any(widths[i] != F for i in moe_positions) or any(
        widths[i] != config.d_ff for i in range(config.n_layers) if i not in moe_positions
    ):
        raise ConfigError(
            f"upcycle: the dense FFN widths {widths} do not fit moe_every={moe_every}, moe_offset={moe_offset} "
            f"(the MoE positions must share one width and the other blocks must have model.d_ff={config.d_ff})"
        )
    if F % g != 0:
        raise ConfigError(f"upcycle: the dense FFN width ({F}) must be divisible by granularity ({g})")
    moe = MoEConfig(
        d_model=config.d_model,
        d_ff=F // g,
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        activation=config.activation,
        normalize_gates=True,
        init_scale=config.init_scale,
    )
    return dataclasses.replace(
        config, moe=moe, moe_every=moe_every, moe_offset=moe_offset, dense_d_ff_at_moe=None
    )


def _expert_weights(w_DF: Tensor, w_FD: Tensor, w_gate_DF: Tensor | None, copies: int, g: int):
    """The bank ``[E, D, f]`` / ``[E, f, D]`` (/ gate ``[E, D, f]``) of ``copies`` copies of the g chunks; expert
    ``c * g + j`` is chunk j of copy c, its ``w_out`` times g."""
    D, F = w_DF.shape
    f = F // g
    w_in_GDf = w_DF.reshape(D, g, f).permute(1, 0, 2)
    w_out_GfD = w_FD.reshape(g, f, D) * g
    w_in_EDf = w_in_GDf.repeat(copies, 1, 1)
    w_out_EfD = w_out_GfD.repeat(copies, 1, 1)
    w_gate_EDf = None if w_gate_DF is None else w_gate_DF.reshape(D, g, f).permute(1, 0, 2).repeat(copies, 1, 1)
    return w_in_EDf, w_out_EfD, w_gate_EDf


def upcycle(
    model: TransformerLM,
    *,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    moe_every: int = 2,
    moe_offset: int = 1,
    capacity_factor: float | None = None,
    router_init_scale: float = DEFAULT_ROUTER_INIT_SCALE,
    generator: torch.Generator | None = None,
) -> TransformerLM:
    """A new MoE :class:`TransformerLM` (config :func:`upcycle_config`) initialised from the dense ``model``, which
    is left unchanged. The router rows are ``N(0, router_init_scale^2)`` drawn from ``generator`` (the global RNG
    when None), one per copy, repeated for its g chunk-experts; every other weight is copied from ``model``.

    The result is in ``model``'s training mode, on its device and dtype. At initialisation its logits equal the
    dense model's up to float rounding (tests/test_upcycle.py).
    """
    if not isinstance(model, TransformerLM):
        raise ConfigError(f"upcycle needs a TransformerLM, got {type(model).__name__}")
    config = upcycle_config(
        model.config, num_experts=num_experts, top_k=top_k, granularity=granularity, moe_every=moe_every,
        moe_offset=moe_offset, capacity_factor=capacity_factor, router_init_scale=router_init_scale,
    )
    g, copies = granularity, num_experts // granularity
    src_sd = model.state_dict()
    # Building the model draws its (discarded) random init from the global RNG: fork it so upcycling leaves the
    # caller's random stream where it was.
    with torch.random.fork_rng(devices=[]):
        new = TransformerLM(config)
    first = next(model.parameters())
    new = new.to(device=first.device, dtype=first.dtype)
    new_sd = new.state_dict()
    out: dict[str, Tensor] = {}
    consumed: set[str] = set()
    moe_prefixes = [f"blocks.{i}.ffn." for i in config.moe_layers()]
    for prefix in moe_prefixes:
        w_gate = src_sd.get(prefix + "w_gate")
        w_in, w_out, w_g = _expert_weights(src_sd[prefix + "w_in"], src_sd[prefix + "w_out"], w_gate, copies, g)
        out[prefix + "experts.w_in"] = w_in
        out[prefix + "experts.w_out"] = w_out
        if w_g is not None:
            out[prefix + "experts.w_gate"] = w_g
        router_ED = new_sd[prefix + "router.weight"]
        rows_CD = torch.randn(
            copies, router_ED.shape[1], generator=generator, dtype=torch.float32,
            device=generator.device if generator is not None else "cpu",
        ) * router_init_scale
        # Expert c * g + j belongs to copy c: its g chunk-experts share the copy's row, so their scores tie.
        out[prefix + "router.weight"] = rows_CD.repeat_interleave(g, dim=0)
        consumed.update(prefix + name for name in ("w_in", "w_out", "w_gate") if prefix + name in src_sd)
    for key, value in new_sd.items():
        if key in out:
            continue
        if key not in src_sd or src_sd[key].shape != value.shape:
            # A parameter the upcycled layer has and the copy cannot fill (a new kind of MoE state): refuse rather
            # than leave it at its random init, which would break the identity silently.
            raise ConfigError(f"upcycle: cannot initialise {key} of the MoE model from the dense model")
        out[key] = src_sd[key]
        consumed.add(key)
    left = sorted(set(src_sd) - consumed)
    if left:
        raise ConfigError(f"upcycle: dense weights with no place in the MoE model: {', '.join(left)}")
    new.load_state_dict({k: v.detach().clone() for k, v in out.items()}, strict=True)
    new.train(model.training)
    return new
