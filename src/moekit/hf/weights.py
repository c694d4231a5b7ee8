"""Tensor names and layouts between a Hugging Face checkpoint and a moekit :class:`~moekit.models.TransformerLM`.

Hugging Face stores ``nn.Linear`` weights ``[out, in]`` and multiplies ``x @ W^T``; moekit's attention does the same
(``w_qkv`` is q, k and v stacked on the output axis, ``w_out`` is o), while its feed-forward weights are ``[in, out]``
(``x @ w``), so FFN and expert tensors are transposed. Experts are read from either checkpoint layout: one tensor per
expert (``experts.{j}.gate_proj.weight``; ``w1``/``w3``/``w2`` in Mixtral's), which is what ``save_pretrained``
writes and what export writes back, or the fused ``experts.gate_up_proj`` ``[E, 2F, D]`` (gate rows first) and
``experts.down_proj`` ``[E, D, F]`` of transformers v5 modules. Only transposes, slices and concatenations are
involved, so a round trip is bit-exact.

Shape legend: E experts, D model width, F expert hidden width.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from moekit.errors import MoekitError
from moekit.hf.families import Family
from moekit.hf.safetensors_io import SafetensorsReader
from moekit.layers.moe import MoE
from moekit.models.lm import TransformerLM

__all__ = ["load_hf_weights", "hf_tensors"]

# Tensors a checkpoint may hold that carry nothing the model needs (older rotary caches).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _Source:
    """Reads tensors by name, checks their shapes, and remembers which were used."""

    def __init__(self, reader: SafetensorsReader) -> None:
        self.reader = reader
        self.used: set[str] = set()

    def read_into(self, name: str, dest: Tensor) -> None:
        """Fill ``dest`` with tensor ``name`` (same shape): straight from the file when the dtypes agree, so the
        largest tensors (embeddings, output head) need no second copy."""
        t = self.get(name, tuple(dest.shape), dest)
        if t is not dest:
            dest.copy_(t)

    def has(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str, shape: tuple[int, ...], out: Tensor | None = None) -> Tensor:
        if name not in self.reader:
            raise MoekitError(f"{self.reader.directory}: the checkpoint has no tensor {name!r}, which the config needs")
        got = tuple(self.reader.shape(name))
        if got != tuple(shape):
            raise MoekitError(
                f"{self.reader.directory}: tensor {name!r} has shape {list(got)}, the config implies {list(shape)}"
            )
        self.used.add(name)
        return self.reader.get(name, out)


@torch.no_grad()
def load_hf_weights(model: TransformerLM, reader: SafetensorsReader, fam: Family) -> None:
    """Copy every tensor of the checkpoint into ``model`` (built from the matching config), one tensor at a time.
    Raises a one-line :class:`MoekitError` for a missing tensor, a wrong shape, or a tensor nothing reads."""
    src = _Source(reader)
    c = model.config
    src.read_into("model.embed_tokens.weight", model.embed.weight)
    src.read_into("model.norm.weight", model.final_norm.weight)
    if model.head is not None:
        src.read_into("lm_head.weight", model.head.weight)
    elif src.has("lm_head.weight"):
        src.used.add("lm_head.weight")  # a tied checkpoint may still list the (shared) head
    H, Hkv, Hd = c.n_heads, c.n_kv_heads, c.head_dim
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        src.read_into(p + "input_layernorm.weight", block.attn_norm.weight)
        src.read_into(p + "post_attention_layernorm.weight", block.ffn_norm.weight)
        attn = block.attn
        a = p + "self_attn."
        splits = [H * Hd, Hkv * Hd, Hkv * Hd]  # q, k and v are consecutive row blocks of w_qkv
        for n, rows in zip("qkv", attn.w_qkv.split(splits), strict=True):
            src.read_into(f"{a}{n}_proj.weight", rows)
        if attn.b_qkv is not None:
            for n, rows in zip("qkv", attn.b_qkv.split(splits), strict=True):
                src.read_into(f"{a}{n}_proj.bias", rows)
        src.read_into(a + "o_proj.weight", attn.w_out)
        if attn.b_out is not None:
            src.read_into(a + "o_proj.bias", attn.b_out)
        if attn.q_norm is not None:
            src.read_into(a + "q_norm.weight", attn.q_norm.weight)
            src.read_into(a + "k_norm.weight", attn.k_norm.weight)
        if isinstance(block.ffn, MoE):
            _load_moe(block.ffn, src, p, fam)
        else:
            _load_dense(block.ffn, src, p + "mlp.", ("gate_proj", "up_proj", "down_proj"))
    left = [k for k in reader.keys() if k not in src.used and not k.endswith(_IGNORED_SUFFIXES)]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise MoekitError(
            f"{reader.directory}: tensors the config does not account for: {', '.join(left[:3])}{more}"
        )


def _load_dense(ffn: torch.nn.Module, src: _Source, prefix: str, names: tuple[str, str, str]) -> None:
    D, F = ffn.w_in.shape
    gate, up, down = names
    ffn.w_gate.copy_(src.get(f"{prefix}{gate}.weight", (F, D)).T)
    ffn.w_in.copy_(src.get(f"{prefix}{up}.weight", (F, D)).T)
    ffn.w_out.copy_(src.get(f"{prefix}{down}.weight", (D, F)).T)


def _load_moe(layer: MoE, src: _Source, p: str, fam: Family) -> None:
    bank = layer.experts
    E, D, F = bank.w_in.shape
    prefixes = [p + fam.moe_prefix + ".", p + "mlp."]
    m = next((q for q in prefixes if src.has(q + "gate.weight")), prefixes[0])
    src.read_into(m + "gate.weight", layer.router.weight)
    if src.has(m + "experts.gate_up_proj"):
        # transformers v5 fused layout: linear(x, gate_up[e]) then chunk(2): the first F outputs are the gate.
        gate_up_E2FD = src.get(m + "experts.gate_up_proj", (E, 2 * F, D))
        bank.w_gate.copy_(gate_up_E2FD[:, :F].transpose(1, 2))
        bank.w_in.copy_(gate_up_E2FD[:, F:].transpose(1, 2))
        del gate_up_E2FD
        bank.w_out.copy_(src.get(m + "experts.down_proj", (E, D, F)).transpose(1, 2))
    else:
        gate, up, down = fam.expert_names
        for j in range(E):
            e = f"{m}experts.{j}."
            bank.w_gate[j].copy_(src.get(f"{e}{gate}.weight", (F, D)).T)
            bank.w_in[j].copy_(src.get(f"{e}{up}.weight", (F, D)).T)
            bank.w_out[j].copy_(src.get(f"{e}{down}.weight", (D, F)).T)
    if layer.shared_experts is not None:
        _load_dense(layer.shared_experts, src, m + "shared_expert.", ("gate_proj", "up_proj", "down_proj"))
        src.read_into(m + "shared_expert_gate.weight", layer.shared_expert_gate.weight)


def hf_tensors(model: TransformerLM, fam: Family) -> Iterator[tuple[str, Tensor]]:
    """The model's tensors under the family's checkpoint names, in the layout ``save_pretrained`` writes (one
    tensor per expert)."""
    c = model.config
    H, Hkv, Hd = c.n_heads, c.n_kv_heads, c.head_dim
    yield "model.embed_tokens.weight", model.embed.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", block.attn_norm.weight
        yield p + "post_attention_layernorm.weight", block.ffn_norm.weight
        attn = block.attn
        a = p + "self_attn."
        splits = [H * Hd, Hkv * Hd, Hkv * Hd]
        for n, w in zip("qkv", attn.w_qkv.split(splits), strict=True):
            yield f"{a}{n}_proj.weight", w
        if attn.b_qkv is not None:
            for n, b in zip("qkv", attn.b_qkv.split(splits), strict=True):
                yield f"{a}{n}_proj.bias", b
        yield a + "o_proj.weight", attn.w_out
        if attn.b_out is not None:
            yield a + "o_proj.bias", attn.b_out
        if attn.q_norm is not None:
            yield a + "q_norm.weight", attn.q_norm.weight
            yield a + "k_norm.weight", attn.k_norm.weight
        ffn = block.ffn
        if isinstance(ffn, MoE):
            m = p + fam.moe_prefix + "."
            yield m + "gate.weight", ffn.router.weight
            gate, up, down = fam.expert_names
            bank = ffn.experts
            for j in range(bank.num_experts):
                e = f"{m}experts.{j}."
                yield f"{e}{gate}.weight", bank.w_gate[j].T
                yield f"{e}{up}.weight", bank.w_in[j].T
                yield f"{e}{down}.weight", bank.w_out[j].T
            if ffn.shared_experts is not None:
                s = ffn.shared_experts
                yield m + "shared_expert.gate_proj.weight", s.w_gate.T
                yield m + "shared_expert.up_proj.weight", s.w_in.T
                yield m + "shared_expert.down_proj.weight", s.w_out.T
                yield m + "shared_expert_gate.weight", ffn.shared_expert_gate.weight
        else:
            yield p + "mlp.gate_proj.weight", ffn.w_gate.T
            yield p + "mlp.up_proj.weight", ffn.w_in.T
            yield p + "mlp.down_proj.weight", ffn.w_out.T
    yield "model.norm.weight", model.final_norm.weight
    if model.head is not None:
        yield "lm_head.weight", model.head.weight
