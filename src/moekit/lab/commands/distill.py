"""``moekit distill RUN_DIR``: distil a trained MoE run (a decoder LM or an encoder-decoder) into its FLOP-matched
dense model (Switch Transformer section 4.2) and report the share of the teacher's gain over a dense baseline that
the student keeps."""

from __future__ import annotations

import argparse
import sys

from moekit.lab.commands import add_overrides

# moekit.lab.distill.run.STUDENT_INITS, spelled out so that building the parser (--help) does not import torch;
# tests/lab/commands/test_help_speed.py checks that the two agree.
INIT_METHODS = ("mean", "top", "random", "scratch")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a trained MoE run into its FLOP-matched dense model")
    p.add_argument("run_dir", help="the teacher: a run directory of an MoE model written by moekit train")
    p.add_argument("--init", default="mean", choices=INIT_METHODS,
                   help="student FFN initialisation where the teacher had experts (default: mean); 'scratch' "
                   "copies nothing from the teacher: the student's own fresh initialisation from train.seed")
    p.add_argument("--dense-baseline", default=None, metavar="RUN_DIR",
                   help="a dense run trained alone on the same data, to compute the share of the gain kept")
    add_overrides(p, "override a training value of the student (repeatable), e.g. --set train.max_steps=200",
                  metavar="train.KEY=VALUE")
    p.add_argument("--run-dir", dest="student_dir", default=None,
                   help="where to write the student run (default: runs/distill-<init>-<time>)")
    p.add_argument("--hard-weight", type=float, default=0.75,
                   help="weight of the label cross-entropy; the teacher term gets 1 - this (Switch: 0.75; 1.0 is the "
                   "no-teacher ablation)")
    p.add_argument("--data-offset", type=int, default=0, metavar="BATCHES",
                   help="skip this many batches of the student's data order before its first step; with the "
                   "teacher's train.seed and its step count, the student trains on windows the teacher never saw "
                   "(default: 0)")
    p.add_argument("--fallback", action="store_true",
                   help="if a newest checkpoint fails its checksum, use the newest one that passes")
    p.set_defaults(func=run)


def _student_threads(args: argparse.Namespace) -> int | None:
    """The student's ``train.threads``: the teacher's, or the ``--set train.threads`` override; None when the run
    directory or the overrides are unreadable (``distill_run`` then reports why)."""
    from moekit.errors import MoekitError
    from moekit.lab.training.run import read_run_config
    from moekit.lab.training.run_config import parse_overrides

    try:
        threads = parse_overrides(args.overrides).get("train", {}).get("threads")
        if threads is None:
            threads = read_run_config(args.run_dir).train.threads
    except (MoekitError, ValueError):
        return None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0 else None


def run(args: argparse.Namespace) -> int:
    from moekit.lab.distill import distill_run
    from moekit.lab.runtime import set_threads

    threads = _student_threads(args)
    if threads is not None:
        set_threads(threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = distill_run(args.run_dir, args.student_dir, init=args.init, dense_baseline=args.dense_baseline,
                       overrides=args.overrides, hard_weight=args.hard_weight, data_offset=args.data_offset,
                       fallback=args.fallback, log=log)
    print(
        f"teacher {info['teacher_val_loss']:.4f}, student ({info['init']} init) {info['student_val_loss']:.4f} "
        f"(before training {info['student_init_val_loss']:.4f}) {info.get('loss_unit', 'nats/token')}; parameters "
        f"{info['student_parameters']:,} / {info['teacher_parameters']:,} = {info['parameter_ratio']:.3f}"
    )
    if info["dense_baseline_val_loss"] is not None:
        kept = info["gain_kept"]
        kept_txt = "n/a (the teacher is no better than the dense baseline)" if kept is None else f"{kept:.1%}"
        print(f"dense baseline {info['dense_baseline_val_loss']:.4f}; share of the teacher's gain kept: {kept_txt}")
    print(f"run directory: {info['run_dir']}")
    return 0
