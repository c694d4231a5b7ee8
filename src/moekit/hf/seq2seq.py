"""Hugging Face encoder-decoder checkpoints in and out: T5 (``model_type`` "t5": v1.1 gated GELU with an untied
output layer, v1.0 ReLU with the tied, scaled one) and Switch Transformers ("switch_transformers") as a moekit
:class:`~moekit.models.Seq2SeqLM`. Like the decoder families (``hf/families.py``, ``hf/weights.py``) nothing here
imports transformers, and a config option moekit does not compute is refused in one line.

What the mapping has to get exactly right (read from transformers 5.x, checked by tests/hf/test_seq2seq_families.py):

- **Which layers are sparse.** Switch's config gives ``num_sparse_encoder_layers`` N; transformers derives
  ``encoder_sparse_step = num_layers // N`` (``num_layers`` when N = 0; a saved ``encoder_sparse_step`` wins) and makes
  block i sparse when ``step == 1`` or ``i % step == 1`` (none when the step is 0). moekit reads that set of blocks
  (``moe_every = step, moe_offset = 1``; ``1, 0`` for step 1; a dense stack when the set is empty), and on export
  searches the N whose rule gives exactly moekit's set (refusing a layout none gives). The decoder likewise.
- **The router.** Switch is top-1 over a float32 softmax, the gate is the raw probability (not renormalised), no
  bias. ``expert_capacity`` is an absolute number of tokens per expert and *per sequence* (transformers routes each
  row of the batch on its own, in sequence order); moekit imports the model dropless, so logits are equal whenever
  Hugging Face drops nothing (``expert_capacity`` >= a sequence's tokens per expert). A token past capacity gets
  output 0 in transformers 5 (as in moekit) but ``router_prob * hidden`` in transformers 4. Export writes an
  ``expert_capacity`` no sequence reaches (:data:`DROPLESS_CAPACITY`), so transformers computes what moekit does.
- **The output layer.** T5 v1.1 has its own ``lm_head.weight``; T5 v1.0 ties it to ``shared.weight`` and scales the
  decoder output by ``d_model ** -0.5`` (transformers 5 records that as ``scale_decoder_outputs``; older configs say
  ``tie_word_embeddings``). A v1.1 model saved by transformers 5 from a config ties the head without scaling it: it
  imports as an untied head holding a copy of the embeddings. Switch ties (and scales) unless
  ``tie_word_embeddings`` is false.
- **Activations.** T5's ``feed_forward_proj`` "gated-gelu" is GELU's tanh form (``gelu_new``), moekit's
  "geglu_tanh"; "relu" is v1.0's. Switch's experts and dense layers are never gated (``dense_act_fn``).

Tensor layouts: attention ``q``, ``k``, ``v``, ``o`` are ``[out, in]`` as moekit's ``w_q``, ``w_kv`` (k then v) and
``w_out``; feed-forward weights are transposed (moekit multiplies ``x @ w``). A round trip is bit-exact.

Shape legend: D model width, F feed-forward hidden width, E experts, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import MoekitError
from moekit.hf.families import Family, _require
from moekit.hf.safetensors_io import SafetensorsReader, write_checkpoint
from moekit.hf.weights import _Source
from moekit.layers.config import MoEConfig
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.models.seq2seq import Seq2SeqLM
from moekit.models.seq2seq_config import STACKS, Seq2SeqConfig

__all__ = [
    "SEQ2SEQ_FAMILIES",
    "DROPLESS_CAPACITY",
    "seq2seq_config_from_hf",
    "hf_config_from_seq2seq",
    "infer_seq2seq_family",
    "load_seq2seq_weights",
    "seq2seq_hf_tensors",
    "save_seq2seq_pretrained",
]

SEQ2SEQ_FAMILIES: dict[str, Family] = {
    "t5": Family("t5", "T5ForConditionalGeneration", False),
    "switch_transformers": Family("switch_transformers", "SwitchTransformersForConditionalGeneration", True),
}

# The expert_capacity export writes: more tokens than any sequence has, so transformers never drops one.
DROPLESS_CAPACITY = 1 << 30

# T5's feed_forward_proj ("gated-" + an ACT2FN name, or the name) and Switch's dense_act_fn, to moekit activations.
# "gated-gelu" is special-cased by transformers to gelu_new (tanh form); "gelu" and "gelu_python" are the erf form.
_T5_ACTIVATIONS = {
    "relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gated-gelu": "geglu_tanh", "gated-gelu_new": "geglu_tanh", "gated-gelu_pytorch_tanh": "geglu_tanh",
    "gated-gelu_python": "geglu", "gated-silu": "swiglu", "gated-swish": "swiglu",
}
_T5_EXPORT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "geglu_tanh": "gated-gelu",
              "geglu": "gated-gelu_python", "swiglu": "gated-silu"}
_SWITCH_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh"}
_SWITCH_EXPORT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}

# Keys of an imported config.json worth keeping on export.
_KEPT_KEYS = ("bos_token_id", "initializer_factor", "n_positions", "task_specific_params", "use_cache")


def _hf_sparse_layers(n_layers: int, step: int) -> list[int]:
    """Transformers' sparse blocks for a stack of ``n_layers`` with sparse step ``step``."""
    if step <= 0:
        return []
    return [i for i in range(n_layers) if step == 1 or i % step == 1]


def _hf_step(n_layers: int, n_sparse: int) -> int:
    return n_layers // n_sparse if n_sparse > 0 else n_layers


def seq2seq_config_from_hf(cfg: dict[str, Any]) -> tuple[Family, Seq2SeqConfig]:
    """The family and the :class:`Seq2SeqConfig` of a T5 or Switch Transformers ``config.json`` (as a dict)."""
    model_type = cfg.get("model_type")
    if model_type not in SEQ2SEQ_FAMILIES:
        raise MoekitError(f"model_type {model_type!r} is not an encoder-decoder moekit reads (t5, switch_transformers)")
    fam = SEQ2SEQ_FAMILIES[model_type]
    n_enc = int(_require(cfg, "num_layers"))
    n_dec = int(cfg.get("num_decoder_layers") or n_enc)
    D = int(_require(cfg, "d_model"))
    d_ff = int(_require(cfg, "d_ff"))
    pad = int(cfg.get("pad_token_id", 0) if cfg.get("pad_token_id") is not None else 0)
    start = cfg.get("decoder_start_token_id")
    eos = cfg.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    common = dict(
        vocab_size=int(_require(cfg, "vocab_size")), d_model=D, n_heads=int(_require(cfg, "num_heads")),
        d_kv=int(_require(cfg, "d_kv")), d_ff=d_ff, n_encoder_layers=n_enc, n_decoder_layers=n_dec,
        relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
        dropout=float(cfg.get("dropout_rate", 0.1)), norm_eps=float(cfg.get("layer_norm_epsilon", 1e-6)),
        pad_token_id=pad, decoder_start_token_id=int(start) if start is not None else pad,
        eos_token_id=None if eos is None else int(eos),
    )
    if fam.model_type == "t5":
        proj = cfg.get("feed_forward_proj", "relu")
        if proj not in _T5_ACTIVATIONS:
            raise MoekitError(
                f"feed_forward_proj {proj!r} is not supported (moekit computes {', '.join(sorted(_T5_ACTIVATIONS))})"
            )
        # transformers 5 stores whether the decoder output is scaled; older configs say it with tie_word_embeddings.
        scaled = cfg["scale_decoder_outputs"] if "scale_decoder_outputs" in cfg else (
            cfg.get("tie_word_embeddings", True) is not False)
        config = Seq2SeqConfig(**common, activation=_T5_ACTIVATIONS[proj], tie_embeddings=bool(scaled),
                               load_balance_coef=0.0, z_loss_coef=0.0)
        return fam, config
    act = cfg.get("dense_act_fn", "relu")
    if act not in _SWITCH_ACTIVATIONS:
        raise MoekitError(
            f"dense_act_fn {act!r} is not supported (moekit computes {', '.join(sorted(_SWITCH_ACTIVATIONS))})"
        )
    if cfg.get("router_bias"):
        raise MoekitError("router_bias = true is not supported (moekit's routers have no bias)")
    router_dtype = cfg.get("router_dtype", "float32")
    if router_dtype not in ("float32", "bfloat16"):
        raise MoekitError(f"router_dtype {router_dtype!r} is not supported (float32 or bfloat16)")
    moe = MoEConfig(
        d_model=D, d_ff=d_ff, num_experts=int(cfg.get("num_experts", 8)), top_k=1, capacity_factor=None,
        activation=_SWITCH_ACTIVATIONS[act], normalize_gates=False,
        jitter_eps=float(cfg.get("router_jitter_noise", 0.0) or 0.0), router_dtype=router_dtype,
    )
    layout: dict[str, Any] = {}
    for stack, n, key in (("encoder", n_enc, "num_sparse_encoder_layers"), ("decoder", n_dec,
                                                                           "num_sparse_decoder_layers")):
        step_key = f"{stack}_sparse_step"
        step = int(cfg[step_key]) if cfg.get(step_key) is not None else _hf_step(n, int(cfg.get(key, 3)))
        sparse = _hf_sparse_layers(n, step)
        prefix = "" if stack == "encoder" else "decoder_"
        layout[f"{stack}_moe"] = moe if sparse else None
        every, offset = (1, 0) if step == 1 else (max(step, 2), 1)
        layout[f"{prefix}moe_every"], layout[f"{prefix}moe_offset"] = every, offset
    config = Seq2SeqConfig(
        **common, activation=_SWITCH_ACTIVATIONS[act], tie_embeddings=cfg.get("tie_word_embeddings", True) is not False,
        load_balance_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
        z_loss_coef=float(cfg.get("router_z_loss_coef", 0.001)), **layout,
    )
    return fam, config


def _switch_moe_mismatch(m: MoEConfig, c: Seq2SeqConfig) -> str | None:
    if m.router != "topk" or m.top_k != 1 or m.score_func != "softmax" or m.noisy_gating or m.batch_priority \
            or m.expert_bias or m.num_expert_groups > 1 or m.routed_scaling_factor != 1.0:
        return "its router is not Switch's top-1 softmax"
    if m.normalize_gates:
        return "its top-1 gates are renormalised (Switch gates by the raw probability)"
    if m.num_shared_experts:
        return "it has shared experts"
    if m.d_ff != c.d_ff or m.activation != c.activation:
        return "its experts' width or activation differ from the dense layers'"
    if m.router_dtype not in ("float32", "bfloat16"):
        return f"its router dtype is {m.router_dtype}"
    return None


def _sparse_counts(c: Seq2SeqConfig) -> dict[str, tuple[int, int]] | str:
    """``{stack: (num_sparse_layers, sparse_step)}`` reproducing moekit's MoE blocks under transformers' rule, or
    why none does."""
    out = {}
    for stack in STACKS:
        n, want = c.n_layers(stack), c.moe_layers(stack)
        # N = n + 1 gives step 0: no sparse block (the only way to write a dense stack).
        found = next(((N, _hf_step(n, N)) for N in range(1, n + 2) if _hf_sparse_layers(n, _hf_step(n, N)) == want),
                     None)
        if found is None:
            return f"no num_sparse_{stack}_layers makes exactly blocks {want} of {n} sparse"
        out[stack] = found
    return out


def _mismatch(fam: Family, c: Seq2SeqConfig) -> str | None:
    """Why ``fam`` cannot represent ``c`` exactly (None when it can)."""
    if c.dense_before_moe:
        return "it has dense_before_moe sublayers"
    if c.encoder_dense_d_ff_at_moe not in (None, c.d_ff) or c.decoder_dense_d_ff_at_moe not in (None, c.d_ff):
        return "its FFN widths differ between blocks"
    if fam.model_type == "t5":
        if c.encoder_moe is not None or c.decoder_moe is not None:
            return "it is an MoE model"
        if c.activation not in _T5_EXPORT:
            return f"activation {c.activation!r} has no feed_forward_proj"
        return None
    if c.activation not in _SWITCH_EXPORT:
        return f"activation {c.activation!r} has no dense_act_fn (Switch's feed-forward layers are never gated)"
    moes = [m for m in (c.encoder_moe, c.decoder_moe) if m is not None]
    if not moes:
        return "it is dense"
    for m in moes:
        why = _switch_moe_mismatch(m, c)
        if why is not None:
            return why
    if len(moes) == 2:
        a, b = moes
        if (a.num_experts, a.router_dtype, a.jitter_eps) != (b.num_experts, b.router_dtype, b.jitter_eps):
            return "its encoder and decoder experts differ (Switch has one expert config)"
    counts = _sparse_counts(c)
    return counts if isinstance(counts, str) else None


def infer_seq2seq_family(c: Seq2SeqConfig) -> Family:
    """The family that represents ``c`` exactly (a one-line error naming why each one cannot, otherwise)."""
    reasons = []
    for fam in SEQ2SEQ_FAMILIES.values():
        why = _mismatch(fam, c)
        if why is None:
            return fam
        reasons.append(f"{fam.model_type}: {why}")
    raise MoekitError("no Hugging Face family represents this model exactly (" + "; ".join(reasons) + ")")


def hf_config_from_seq2seq(c: Seq2SeqConfig, fam: Family, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``c`` in family ``fam`` (which must represent it: see :func:`infer_seq2seq_family`)."""
    why = _mismatch(fam, c)
    if why is not None:
        raise MoekitError(f"a {fam.model_type} model cannot represent this model exactly: {why}")
    out: dict[str, Any] = {k: v for k, v in (extra or {}).items() if k in _KEPT_KEYS}
    out.update(
        model_type=fam.model_type, architectures=[fam.architecture], vocab_size=c.vocab_size, d_model=c.d_model,
        d_kv=c.d_kv, d_ff=c.d_ff, num_heads=c.n_heads, num_layers=c.n_encoder_layers,
        num_decoder_layers=c.n_decoder_layers, relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=c.dropout,
        layer_norm_epsilon=c.norm_eps, is_encoder_decoder=True, pad_token_id=c.pad_token_id,
        decoder_start_token_id=c.decoder_start_token_id, eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_embeddings, dtype="float32",
    )
    if fam.model_type == "t5":
        out.update(feed_forward_proj=_T5_EXPORT[c.activation], scale_decoder_outputs=c.tie_embeddings)
        return out
    m = c.encoder_moe if c.encoder_moe is not None else c.decoder_moe
    counts = _sparse_counts(c)
    out.update(
        dense_act_fn=_SWITCH_EXPORT[c.activation], num_experts=m.num_experts, expert_capacity=DROPLESS_CAPACITY,
        router_bias=False, router_dtype=m.router_dtype, router_jitter_noise=m.jitter_eps,
        router_ignore_padding_tokens=False, router_aux_loss_coef=c.load_balance_coef,
        router_z_loss_coef=c.z_loss_coef, add_router_probs=False,
        num_sparse_encoder_layers=counts["encoder"][0], encoder_sparse_step=counts["encoder"][1],
        num_sparse_decoder_layers=counts["decoder"][0], decoder_sparse_step=counts["decoder"][1],
    )
    return out


@torch.no_grad()
def load_seq2seq_weights(model: Seq2SeqLM, reader: SafetensorsReader, fam: Family) -> None:
    """Copy every tensor of a T5 / Switch checkpoint into ``model`` (built from the matching config). Raises a
    one-line :class:`MoekitError` for a missing tensor, a wrong shape, or a tensor nothing reads."""
    src = _Source(reader)
    src.read_into("shared.weight", model.embed.weight)
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if src.has(name) and not torch.equal(src.get(name, tuple(model.embed.weight.shape)), model.embed.weight):
            raise MoekitError(f"{reader.directory}: {name} differs from shared.weight (moekit shares one embedding)")
    if model.head is not None:
        if src.has("lm_head.weight") or fam.model_type != "t5":
            src.read_into("lm_head.weight", model.head.weight)
        else:  # transformers 5 saved T5 v1.1 with a tied, unscaled head: the head is the embedding
            model.head.weight.copy_(model.embed.weight)
    elif src.has("lm_head.weight"):
        if not torch.equal(src.get("lm_head.weight", tuple(model.embed.weight.shape)), model.embed.weight):
            raise MoekitError(f"{reader.directory}: lm_head.weight differs from shared.weight although the decoder "
                              "output is scaled (a tied head); moekit has no scaled untied head")
    for stack in STACKS:
        for i, block in enumerate(getattr(model, stack).blocks):
            for prefix, (norm, attn) in _attention_names(stack, i, block).items():
                src.read_into(prefix + "layer_norm.weight", norm.weight)
                a = prefix + ("EncDecAttention." if attn.cross else "SelfAttention.")
                src.read_into(a + "q.weight", attn.w_q)
                k_rows, v_rows = attn.w_kv.chunk(2)
                src.read_into(a + "k.weight", k_rows)
                src.read_into(a + "v.weight", v_rows)
                src.read_into(a + "o.weight", attn.w_out)
                if attn.relative_bias is not None:
                    src.read_into(a + "relative_attention_bias.weight", attn.relative_bias.weight)
            first = 2 if stack == "decoder" else 1
            for j, sub in enumerate(block.ff):
                p = f"{stack}.block.{i}.layer.{first + j}."
                src.read_into(p + "layer_norm.weight", sub.norm.weight)
                if isinstance(sub.ffn, MoE):
                    _load_switch_moe(sub.ffn, src, p + "mlp.")
                else:
                    _load_dense(sub.ffn, src, p + ("DenseReluDense." if fam.model_type == "t5" else "mlp."))
        src.read_into(f"{stack}.final_layer_norm.weight", getattr(model, stack).final_norm.weight)
    ignored = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
               # old T5 checkpoints carry a cross-attention bias table that T5 never uses (transformers ignores it)
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
    left = [k for k in reader.keys() if k not in src.used and k not in ignored]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise MoekitError(f"{reader.directory}: tensors the config does not account for: {', '.join(left[:3])}{more}")


def _attention_names(stack: str, i: int, block: Any) -> dict[str, tuple[Any, Any]]:
    out = {f"{stack}.block.{i}.layer.0.": (block.self_attn_norm, block.self_attn)}
    if block.cross_attn is not None:
        out[f"{stack}.block.{i}.layer.1."] = (block.cross_attn_norm, block.cross_attn)
    return out


def _load_dense(ffn: DenseFFN, src: _Source, p: str) -> None:
    D, F = ffn.w_in.shape
    if ffn.w_gate is not None:  # T5's gated layer: wi_0 goes through the activation, wi_1 is linear
        ffn.w_gate.copy_(src.get(p + "wi_0.weight", (F, D)).T)
        ffn.w_in.copy_(src.get(p + "wi_1.weight", (F, D)).T)
    else:
        ffn.w_in.copy_(src.get(p + "wi.weight", (F, D)).T)
    ffn.w_out.copy_(src.get(p + "wo.weight", (D, F)).T)


def _load_switch_moe(layer: MoE, src: _Source, p: str) -> None:
    bank = layer.experts
    E, D, F = bank.w_in.shape
    src.read_into(p + "router.classifier.weight", layer.router.weight)
    for j in range(E):
        e = f"{p}experts.expert_{j}."
        bank.w_in[j].copy_(src.get(e + "wi.weight", (F, D)).T)
        bank.w_out[j].copy_(src.get(e + "wo.weight", (D, F)).T)


def seq2seq_hf_tensors(model: Seq2SeqLM, fam: Family) -> Iterator[tuple[str, Tensor]]:
    """The model's tensors under the family's checkpoint names (the layout transformers' ``save_pretrained``
    writes)."""
    yield "shared.weight", model.embed.weight
    if fam.model_type == "switch_transformers" and model.head is not None:
        # Untied, transformers 5 keeps (and writes) separate encoder and decoder input embeddings for Switch; they
        # are copies here (safetensors refuses tensors that share memory).
        yield "encoder.embed_tokens.weight", model.embed.weight.detach().clone()
        yield "decoder.embed_tokens.weight", model.embed.weight.detach().clone()
    for stack in STACKS:
        for i, block in enumerate(getattr(model, stack).blocks):
            for prefix, (norm, attn) in _attention_names(stack, i, block).items():
                a = prefix + ("EncDecAttention." if attn.cross else "SelfAttention.")
                k_rows, v_rows = attn.w_kv.chunk(2)
                yield a + "q.weight", attn.w_q
                yield a + "k.weight", k_rows
                yield a + "v.weight", v_rows
                yield a + "o.weight", attn.w_out
                if attn.relative_bias is not None:
                    yield a + "relative_attention_bias.weight", attn.relative_bias.weight
                yield prefix + "layer_norm.weight", norm.weight
            first = 2 if stack == "decoder" else 1
            for j, sub in enumerate(block.ff):
                p = f"{stack}.block.{i}.layer.{first + j}."
                ffn = sub.ffn
                if isinstance(ffn, MoE):
                    yield p + "mlp.router.classifier.weight", ffn.router.weight
                    for e in range(ffn.experts.num_experts):
                        yield f"{p}mlp.experts.expert_{e}.wi.weight", ffn.experts.w_in[e].T
                        yield f"{p}mlp.experts.expert_{e}.wo.weight", ffn.experts.w_out[e].T
                else:
                    d = p + ("DenseReluDense." if fam.model_type == "t5" else "mlp.")
                    if ffn.w_gate is not None:
                        yield d + "wi_0.weight", ffn.w_gate.T
                        yield d + "wi_1.weight", ffn.w_in.T
                    else:
                        yield d + "wi.weight", ffn.w_in.T
                    yield d + "wo.weight", ffn.w_out.T
                yield p + "layer_norm.weight", sub.norm.weight
        yield f"{stack}.final_layer_norm.weight", getattr(model, stack).final_norm.weight
    if model.head is not None:
        yield "lm_head.weight", model.head.weight


def save_seq2seq_pretrained(
    model: Seq2SeqLM,
    path: str | Path,
    *,
    model_type: str | None = None,
    extra_config: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Family:
    """Write ``model`` as a T5 or Switch Transformers checkpoint in ``path`` (``config.json`` and safetensors, each
    file atomic). ``model_type`` picks the family; by default the one that represents the model exactly."""
    if model_type is not None and model_type not in SEQ2SEQ_FAMILIES:
        raise MoekitError(f"model_type {model_type!r} is not an encoder-decoder family (t5, switch_transformers)")
    fam = SEQ2SEQ_FAMILIES[model_type] if model_type is not None else infer_seq2seq_family(model.config)
    config = hf_config_from_seq2seq(model.config, fam, extra_config)
    write_checkpoint(path, seq2seq_hf_tensors(model, fam), config, max_shard_bytes)
    return fam
