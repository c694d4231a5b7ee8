"""``moekit validate CONFIG``: check a run config strictly (the same checks ``moekit train`` runs first), and
print
the model's size and cost. No data is read and nothing is trained."""

from __future__ import annotations

import argparse

from moekit.lab.commands import add_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a config file strictly, without training")
    p.add_argument("config", help="TOML config file or a name from configs/")
    add_overrides(p, "override one config value before checking (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.lab.training.run_config import load_run_config
    from moekit.models import parameter_counts
    from moekit.models.flops import flops_per_token

    cfg = load_run_config(args.config, args.overrides)
    if cfg.is_vit:
        return _report_vit(args.config, cfg)
    lm = cfg.lm_config(cfg.data.vocab_size)
    counts = parameter_counts(lm)
    flops = flops_per_token(lm, cfg.data.seq_len)
    kind = (
        "dense"
        if lm.moe is None
        else (f"MoE: {lm.moe.num_experts} experts, top-{lm.moe.top_k}, MoE blocks {lm.moe_layers()}")
    )
    print(f"{args.config}: OK ({kind})")
    print(
        f"parameters: {counts['total']:,} total, {counts['active']:,} active per token "
        f"(vocabulary {cfg.data.vocab_size} assumed)"
    )
    print(f"FLOPs per token: {flops['forward'] / 1e6:.2f} M forward, {flops['train'] / 1e6:.2f} M training")
    return 0


def _report_vit(name: str, cfg) -> int:  # noqa: ANN001 - a RunConfig
    from moekit.layers.config import SoftMoEConfig
    from moekit.models.vit import vit_flops_per_image, vit_parameter_counts

    vit = cfg.vit_config()
    counts = vit_parameter_counts(vit)
    flops = vit_flops_per_image(vit)
    m = vit.moe
    if m is None:
        kind = "dense ViT"
    elif isinstance(m, SoftMoEConfig):
        kind = (
            f"Soft MoE ViT: {m.num_experts} experts x {m.slots_per_expert} slots, MoE blocks {vit.moe_block_indices()}"
        )
    else:
        routing = "expert choice" if m.router == "expert_choice" else f"top-{m.top_k}"
        kind = f"MoE ViT: {m.num_experts} experts, {routing}, MoE blocks {vit.moe_block_indices()}"
    print(f"{name}: OK ({kind}; {vit.num_tokens} tokens per image)")
    print(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token")
    print(f"FLOPs per image: {flops['forward'] / 1e6:.2f} M forward, {flops['train'] / 1e6:.2f} M training")
    return 0
