"""Training step time of LoRA on the experts vs LoRA on attention only vs no adapter, on small MoE LMs.

Two models of the same shape (Qwen3-MoE style: D = 128, 2 layers, 4 query / 2 key-value heads of width 32 with
per-head q/k norm, 8 SwiGLU experts of width 64, top-2, vocabulary 512):

- a transformers ``Qwen3MoeForCausalLM`` built from a config (random weights, nothing downloads), run with its
  default experts implementation (``grouped_mm``);
- the moekit equivalent, a ``TransformerLM`` with an ``MoE`` in every block.

Variants per model: ``experts`` (LoRA r = 8 on every expert projection: moekit's per-expert bank LoRA),
``attention`` (LoRA r = 8 on q, k, v, o: transformers only; moekit's attention keeps its weights as raw parameters,
which adapters do not reach) and ``none`` (no adapter: full fine-tuning, every parameter trains). A step is forward,
backward and an AdamW step on one batch of 8 x 64 random tokens. All variants live in one process; every round
times ``--steps`` steps of each variant in turn (the order rotating each round), so a slow-down of the shared machine
hits all alike; reported is the median over rounds of each variant's mean step time, its ratio to ``none``, and the
median of the per-round ratios to ``none``.

    python benchmarks/expert_lora.py        # writes benchmarks/results/expert_lora.md (1 thread)
    python benchmarks/expert_lora.py --rounds 2 --steps 2 --out /tmp/expert_lora.md   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moekit import MoEConfig  # noqa: E402
from moekit.adapters import LoRAConfig, apply_adapters, trainable_parameters  # noqa: E402
from moekit.models.config import LMConfig  # noqa: E402
from moekit.models.lm import TransformerLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, FF, VOCAB = 128, 2, 4, 2, 32, 8, 2, 64, 512
BATCH, SEQ = 8, 64
LORA = LoRAConfig(r=8, alpha=16.0)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def hf_model() -> torch.nn.Module:
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=4 * D, moe_intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, norm_topk_prob=True, max_position_embeddings=SEQ, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).train()


def moekit_model() -> torch.nn.Module:
    moe = MoEConfig(d_model=D, d_ff=FF, num_experts=EXPERTS, top_k=TOP_K, capacity_factor=None, activation="swiglu",
                    jitter_eps=0.0)
    cfg = LMConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS,
                   head_dim=HEAD_DIM, qk_norm="head", d_ff=4 * D, max_seq_len=SEQ, activation="swiglu", moe=moe,
                   moe_every=1, moe_offset=0)
    torch.manual_seed(0)
    return TransformerLM(cfg).train()


class Case:
    """One model + variant with its optimizer and a ``step()``: forward, backward, AdamW."""

    def __init__(self, family: str, variant: str) -> None:
        self.family, self.variant = family, variant
        self.model = hf_model() if family == "transformers" else moekit_model()
        if variant == "experts":
            apply_adapters(self.model, LORA, ["experts"])
        elif variant == "attention":
            apply_adapters(self.model, LORA, ATTENTION)
        self.counts = trainable_parameters(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.tokens_BT = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        self.times: list[float] = []

    def loss(self) -> torch.Tensor:
        if self.family == "transformers":
            return self.model(input_ids=self.tokens_BT, labels=self.tokens_BT).loss
        return self.model(self.tokens_BT[:, :-1], self.tokens_BT[:, 1:]).loss

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()

    def timed(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.times.append((time.perf_counter() - t0) / steps)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(cases: list[Case], args: argparse.Namespace, command: str) -> str:
    import transformers

    lines = [
        "# LoRA on the experts vs on attention vs no adapter: training step time",
        "",
        f"Qwen3-MoE-shaped LMs (D = {D}, {LAYERS} layers, {HEADS} query / {KV_HEADS} key-value heads of width "
        f"{HEAD_DIM}, {EXPERTS} SwiGLU experts of width {FF}, top-{TOP_K}, vocabulary {VOCAB}): a transformers "
        f"`Qwen3MoeForCausalLM` (experts implementation `grouped_mm`) and the moekit `TransformerLM` of the same "
        f"shape. One step = forward + backward + AdamW on {BATCH} x {SEQ} random tokens. LoRA r = {LORA.r}, "
        f"alpha = {LORA.alpha:g}; `experts`: every expert projection (per-expert factors run by the grouped "
        f"matmul); `attention`: q, k, v, o; `none`: no adapter, full fine-tuning. {args.rounds} interleaved rounds "
        f"of {args.steps} steps per variant (order rotating), after {args.warmup} warm-up steps each; the figure "
        f"is the median over rounds of the mean step time; `median of per-round / none` divides each round's "
        f"time by the same round's `none` time.",
        "",
        f"Command: `{command}`. torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU: {cpu_name()} ({os.cpu_count()} logical CPUs, shared with "
        f"other jobs). Measured {datetime.date.today().isoformat()}.",
        "",
        "| model | variant | trainable params | median step (ms) | / none | median of per-round / none | "
        "rounds min-max (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in ("transformers", "moekit"):
        group = [c for c in cases if c.family == family]
        none = next(c for c in group if c.variant == "none").times
        base = statistics.median(none)
        for c in group:
            med = statistics.median(c.times)
            # Ratios within a round compare runs seconds apart: less exposed to the shared machine's drift.
            per_round = statistics.median(t / n for t, n in zip(c.times, none, strict=True))
            lines.append(
                f"| {family} | {c.variant} | {c.counts['trainable']:,} ({100 * c.counts['fraction']:.1f} %) | "
                f"{1000 * med:.1f} | {med / base:.2f} | {per_round:.2f} | "
                f"{1000 * min(c.times):.1f}-{1000 * max(c.times):.1f} |")
        if family == "moekit":
            lines.append("| moekit | attention | n/a: moekit's attention weights are raw parameters (`w_qkv`, "
                         "`w_out`), not `nn.Linear`; adapters reach its expert banks | | | | |")
    lines += [
        "",
        "Reading the table: with frozen base weights, backward stops at the earliest adapted layer, so LoRA on the "
        "experts skips the first block's attention backward that LoRA on attention needs; full fine-tuning also pays "
        "the weight gradients and AdamW over every parameter. The transformers experts carry fewer LoRA parameters "
        "than moekit's because `gate_up_proj` is one fused projection (one `A` for gate and up) while moekit's "
        "`w_gate` and `w_in` are two. The machine is shared, hence the spread between rounds.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "expert_lora.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the CPU is shared: one thread unless told otherwise
    command = "python benchmarks/expert_lora.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    cases = [Case(f, v) for f in ("transformers", "moekit")
             for v in (("experts", "attention", "none") if f == "transformers" else ("experts", "none"))]
    for c in cases:
        for _ in range(args.warmup):
            c.step()
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for c in cases[r % len(cases):] + cases[:r % len(cases)]:
            c.timed(args.steps)
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = render(cases, args, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
