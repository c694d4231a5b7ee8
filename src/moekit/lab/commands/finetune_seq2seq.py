"""``moekit finetune-seq2seq RUN_DIR --task NAME[,NAME...] --out OUT_DIR``: fine-tune a pre-trained encoder-decoder
run text to text on labelled tasks and score the test split by exact match and rank classification (the logic is
:mod:`moekit.lab.seq2seq_finetune`; docs/TRAINING.md "Fine-tuning an encoder-decoder")."""

from __future__ import annotations

import argparse
import sys

from moekit.lab.commands import add_tune_malloc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune-seq2seq",
                       help="fine-tune a pre-trained encoder-decoder run on labelled tasks (text to text)")
    p.add_argument("run_dir", help="a seq2seq run directory written by moekit train (its newest valid checkpoint)")
    p.add_argument("--task", required=True,
                   help="task name, or several separated by commas (multitask), from moekit.lab.adapters.tasks")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    # Choices and ranges are checked by Seq2SeqFinetuneConfig, so a bad value is one line like any moekit error.
    p.add_argument("--update", default="all",
                   help="all | non-moe (freeze routers and experts) | moe (train only routers and experts)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (0: only score the run; default 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, constant after warm-up (default 1e-3)")
    p.add_argument("--optimizer", default="adamw", help="adamw | adafactor")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=None,
                   help="residual, attention, embedding and dense-FFN dropout (default: the run's model.dropout)")
    p.add_argument("--expert-dropout", type=float, default=None,
                   help="expert hidden dropout (default: the run's moe.expert_dropout); Switch: 0.4 with "
                   "--dropout 0.1")
    p.add_argument("--eval-every", type=int, default=0, help="score the test split every N steps (0: at the end)")
    p.add_argument("--max-input-tokens", type=int, default=128, help="encoder input cap, end-of-text included")
    p.add_argument("--n-train", type=int, default=1000, help="training examples per task")
    p.add_argument("--n-test", type=int, default=100, help="test examples per task")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: automatic)")
    add_tune_malloc(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.lab.runtime import set_threads
    from moekit.lab.seq2seq_finetune import Seq2SeqFinetuneConfig, finetune_seq2seq, parse_tasks

    config = Seq2SeqFinetuneConfig(
        tasks=parse_tasks(args.task), update=args.update, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, optimizer=args.optimizer, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, dropout=args.dropout, expert_dropout=args.expert_dropout,
        eval_every=args.eval_every, max_input_tokens=args.max_input_tokens, n_train=args.n_train,
        n_test=args.n_test, threads=args.threads,
    )
    set_threads(config.threads)
    summary = finetune_seq2seq(args.run_dir, args.out, config,
                               log=lambda msg: print(msg, file=sys.stderr, flush=True))
    for task, row in summary["per_task"].items():
        print(f"{task}: exact match {_pct(row['exact_match'])}, rank classification {_pct(row['rank'])}, "
              f"majority class {_pct(row['majority'])} ({row['n_test']} test examples)")
    if len(summary["per_task"]) > 1:
        print(f"mean over tasks: exact match {_pct(summary['exact_match'])}, rank classification "
              f"{_pct(summary['rank'])}, majority class {_pct(summary['majority'])}")
    print(f"output directory: {summary['out_dir']}")
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
