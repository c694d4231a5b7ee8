"""``TransformerLM``: a decoder-only language model whose FFNs are dense or MoE (Switch / GLaM / ST-MoE
layouts).

The model returns its logits together with every MoE layer's aux (losses and metrics) and, given targets, the
training loss ``CE + c_B * mean_layers(L_B) + c_z * mean_layers(L_Z)`` (docs/ALGORITHMS.md section 2; averaging over MoE
layers follows T5X). Nothing is stashed in module state between calls.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.aux import MoEAux, model_loss
from moekit.layers.moe import MoE
from moekit.models.blocks import Block, KVCache, RMSNorm, dense_ffn
from moekit.models.config import LMConfig

__all__ = ["TransformerLM", "LMOutput", "KVCache"]


@dataclass
class LMOutput:
    """What ``TransformerLM.forward`` returns.

    Attributes:
        logits_BTV: next-token logits (the autocast dtype under autocast).
        aux: one :class:`MoEAux` per MoE block, in block order (empty for a dense model).
        loss: total training loss (float32 scalar) when targets were given, else None.
        ce_loss: mean token cross-entropy (float32) when targets were given.
        load_balancing_loss: mean over MoE layers of L_B (0 for a dense model).
        z_loss: mean over MoE layers of L_Z (0 for a dense model).
    """

    logits_BTV: Tensor
    aux: list[MoEAux] = field(default_factory=list)
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    load_balancing_loss: Tensor | None = None
    z_loss: Tensor | None = None


class TransformerLM(nn.Module):
    """Pre-norm decoder with RMSNorm, rotary causal attention and tied embeddings (option).

    Block ``i`` holds an MoE FFN when ``config.is_moe_layer(i)``; the others a dense FFN. Call
    ``model(tokens_BT, targets_BT)`` to get an :class:`LMOutput`.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"TransformerLM expects an LMConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        # Small embeddings, as GPT-2: with tied weights they are also the output projection.
        nn.init.normal_(self.embed.weight, mean=0.0, std=0.02)
        blocks = []
        for i in range(c.n_layers):
            if c.is_moe_layer(i):
                ffn: nn.Module = MoE(c.moe)
            else:
                ffn = dense_ffn(c.d_model, c.dense_d_ff(i), c.activation, c.init_scale)
            blocks.append(
                Block(
                    ffn,
                    c.d_model,
                    c.n_heads,
                    c.max_seq_len,
                    rope_base=c.rope_base,
                    init_scale=c.init_scale,
                    dropout=c.dropout,
                    norm_eps=c.norm_eps,
                    n_kv_heads=c.n_kv_heads,
                    head_dim=c.head_dim,
                    qk_norm=c.qk_norm,
                    qkv_bias=c.qkv_bias,
                    out_bias=c.out_bias,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(c.d_model, c.norm_eps)
        # With tied embeddings there is no separate head parameter: safetensors refuses shared storage, and one
        # tensor is what gets saved either way.
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        if self.head is not None:
            nn.init.normal_(self.head.weight, mean=0.0, std=0.02)

    def forward(
        self,
        tokens_BT: Tensor,
        targets_BT: Tensor | None = None,
        replay: list[Tensor] | None = None,
        *,
        cache: KVCache | None = None,
    ) -> LMOutput:
        """Logits (and losses when ``targets_BT`` is given). ``replay``: one int64 ``[B * T, k]`` tensor of expert ids
        per MoE layer, in block order (``[a.routing.expert_ids_SK for a in out.aux]`` of an earlier pass): every MoE
        layer routes to exactly those experts, with gates from this pass's routers (router replay). ``cache`` (a
        :meth:`new_cache`): the tokens continue the cached sequence, and their keys and values are added to it
        (incremental decoding: each new token costs one position, not the whole prefix)."""
        c = self.config
        if tokens_BT.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens_BT.shape)}")
        start = 0 if cache is None else len(cache)
        if start + tokens_BT.shape[1] > c.max_seq_len:
            raise ValueError(
                f"sequence length {start + tokens_BT.shape[1]} exceeds model.max_seq_len={c.max_seq_len}"
            )
        x_BTD = self.embed(tokens_BT)
        aux: list[MoEAux] = []
        replay_iter = None
        if replay is not None:
            if len(replay) != len(self.moe_layers):
                raise ValueError(f"replay needs one routing per MoE layer ({len(self.moe_layers)}), got {len(replay)}")
            replay_iter = iter(replay)
        for i, block in enumerate(self.blocks):
            kwargs = {}
            if replay_iter is not None and isinstance(block.ffn, MoE):
                kwargs["replay"] = next(replay_iter)
            if cache is not None:
                kwargs["cache"] = cache.layers[i]
            x_BTD, block_aux = block(x_BTD, **kwargs)
            if block_aux is not None:
                aux.append(block_aux)
        h_BTD = self.final_norm(x_BTD)
        w_VD = self.embed.weight if self.head is None else self.head.weight
        logits_BTV = F.linear(h_BTD, w_VD)
        out = LMOutput(logits_BTV=logits_BTV, aux=aux)
        if targets_BT is None:
            return out
        # Cross-entropy in float32: the logsumexp over V of bf16 logits loses precision.
        ce = F.cross_entropy(logits_BTV.float().reshape(-1, c.vocab_size), targets_BT.reshape(-1))
        out.ce_loss = ce
        out.loss, out.load_balancing_loss, out.z_loss = model_loss(ce, aux, c.load_balance_coef, c.z_loss_coef)
        return out

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def new_cache(self) -> KVCache:
        """An empty key/value cache for incremental decoding (see :meth:`forward`)."""
        return KVCache(len(self.blocks))

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (1-D ``[T]``, or ``[B, T]`` for a batch of equal-length
        prompts) with a KV cache: the prompt runs once, then each new token one position at a time. Temperature 0
        means greedy decoding. Returns the prompts followed by the new tokens (same rank as ``prompt``).

        Past ``max_seq_len`` tokens the model sees a sliding window of the last ``max_seq_len`` (recomputed per
        token, as rotary tables end there)."""
        if prompt.dim() not in (1, 2) or prompt.shape[-1] == 0:
            raise ValueError(
                f"the prompt must be token ids [T] or [batch, T] with T >= 1, got shape {tuple(prompt.shape)}"
            )
        seq_BT = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
        L = self.config.max_seq_len
        cache = self.new_cache() if seq_BT.shape[1] < L else None
        step_BT = seq_BT[:, -L:]
        for _ in range(max_new_tokens):
            logits_BV = self(step_BT, cache=cache).logits_BTV[:, -1].float()
            if temperature <= 0:
                nxt_B1 = logits_BV.argmax(dim=-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k is not None and top_k < logits_BV.shape[-1]:
                    kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
                nxt_B1 = torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=generator)
            seq_BT = torch.cat([seq_BT, nxt_B1.to(seq_BT.dtype)], dim=1)
            if cache is not None and len(cache) < L:
                step_BT = nxt_B1.to(seq_BT.dtype)
            else:  # the window is full: slide it, without a cache
                cache, step_BT = None, seq_BT[:, -L:]
        return seq_BT[0] if prompt.dim() == 1 else seq_BT
