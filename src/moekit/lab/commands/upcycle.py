"""``moekit upcycle SOURCE --experts E --top-k K --out RUN_DIR``: sparse upcycling (Komatsuzaki et al. 2022) of a
trained dense language-model run into a new MoE run.

The new run directory gets a copy of SOURCE's tokenizer and token arrays, the MoE config (SOURCE's config with the
``[moe]`` section added and every other section, ``[train]`` included, kept) and the upcycled weights as its initial
weights (``train.init_from``, :func:`moekit.lab.training.run.start_run_from_weights`). At that point the MoE model
computes exactly SOURCE's function (:mod:`moekit.upcycle`), so ``moekit eval RUN_DIR`` reports the dense model's
loss, and ``moekit train --resume RUN_DIR --set train.max_steps=N`` trains it from there. The directory is built
under a temporary name and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upcycle", help="turn a trained dense LM run into an MoE run whose experts start as copies")
    p.add_argument("source", help="a dense language-model run directory (its newest valid checkpoint is used)")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer (E)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (k; renormalised gates)")
    p.add_argument("--granularity", type=int, default=1,
                   help="split each dense FFN into g fine-grained chunk-experts of d_ff / g (E and k multiples of g)")
    p.add_argument("--moe-every", type=int, default=2,
                   help="block i is MoE when i %% n == 1 %% n (default 2: blocks 1, 3, ...; 1: every block)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="token-choice capacity factor (default: dropless, so nothing drops at initialisation)")
    p.add_argument("--seed", type=int, default=None, help="seed of the router init (default: SOURCE's train.seed)")
    p.add_argument("--out", required=True, help="the new run directory (must not exist)")
    p.set_defaults(func=run)


def upcycle_run(
    source: str | Path,
    out: str | Path,
    *,
    experts: int,
    top_k: int,
    granularity: int = 1,
    moe_every: int = 2,
    capacity_factor: float | None = None,
    seed: int | None = None,
) -> dict:
    """Create the upcycled run ``out`` from the dense run ``source``; returns what the command prints (the source
    step, the parameter counts of both models). One-line :class:`MoekitError` for a missing or MoE source, a
    run that is not a language model, or an existing ``out``."""
    import torch

    from moekit.atomic import atomic_dir
    from moekit.errors import MoekitError
    from moekit.lab.training.run import load_trained_run, read_run_config, start_run_from_weights
    from moekit.models.flops import parameter_counts
    from moekit.models.lm import TransformerLM
    from moekit.upcycle import upcycle, upcycle_config

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise MoekitError(f"source run directory {str(source)!r} does not exist")
    if out.exists():
        raise MoekitError(f"{out} already exists; choose a new --out directory")
    config = read_run_config(source)
    if config.arch != "lm":
        raise MoekitError(f"{source} is {config.task.title} run; upcycling works on language-model runs")
    if config.moe is not None:
        raise MoekitError(f"{source} is already an MoE model ([moe] section); upcycling starts from a dense run")
    moe_model = upcycle_config(config.model, num_experts=experts, top_k=top_k, granularity=granularity,
                               moe_every=moe_every, moe_offset=1 % moe_every, capacity_factor=capacity_factor)
    new_config = dataclasses.replace(config, model=moe_model)
    new_config.__post_init__()  # the checks across sections (e.g. expert parallelism must divide E)
    run = load_trained_run(source, command="eval")
    dense = run.model
    if not isinstance(dense, TransformerLM):
        raise MoekitError(f"{source} does not hold a TransformerLM")
    gen = torch.Generator().manual_seed(config.train.seed if seed is None else seed)
    model = upcycle(dense, num_experts=experts, top_k=top_k, granularity=granularity, moe_every=moe_every,
                    moe_offset=1 % moe_every, capacity_factor=capacity_factor, generator=gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for name in config.task.data_files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, tmp / name)
        start_run_from_weights(new_config, tmp, model)
    return {
        "source_step": run.step,
        "source_checkpoint": str(run.checkpoint),
        "dense_parameters": parameter_counts(dense.config)["total"],
        "parameters": parameter_counts(model.config)["total"],
        "active_parameters": parameter_counts(model.config)["active"],
        "moe_layers": model.config.moe_layers(),
    }


def run(args: argparse.Namespace) -> int:
    info = upcycle_run(args.source, args.out, experts=args.experts, top_k=args.top_k, granularity=args.granularity,
                       moe_every=args.moe_every, capacity_factor=args.capacity_factor, seed=args.seed)
    print(
        f"upcycled {args.source} (step {info['source_step']}) into {args.experts} experts, top-{args.top_k}, "
        f"granularity {args.granularity}, MoE blocks {info['moe_layers']}: {info['parameters']:,} parameters "
        f"({info['active_parameters']:,} active per token; dense {info['dense_parameters']:,})"
    )
    print(f"run directory: {args.out}  (train it: moekit train --resume {args.out} --set train.max_steps=N)")
    return 0
