"""``moekit eval RUN_DIR``: validation loss and perplexity (test accuracy for an image classifier) of a run's
newest checkpoint that passes its checksum.

A checkpoint that fails is reported by file name and the previous one is used; if none passes, the command
fails.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run's checkpoint")
    p.add_argument("run_dir", help="a run directory written by moekit train")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the whole split)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from moekit.lab.training.run import load_trained_run
    from moekit.training.trainer import Trainer

    def report(msg: str) -> None:
        print(f"moekit eval: warning: {msg}", file=sys.stderr)

    run = load_trained_run(args.run_dir, fallback=True, warn=report, command="eval")
    task = run.config.task
    train_cfg = dataclasses.replace(run.config.train, eval_batches=args.batches, progress="off")
    # The trainer evaluates at the run's batch size; its training batches are never drawn here.
    batches = task.batches(run.config, run.data)
    trainer = Trainer(train_cfg, run.model, batches, task.eval_data(run.config, run.data), args.run_dir, log=report)
    loss = trainer.evaluate()
    print(f"checkpoint {run.checkpoint.name} (step {run.step}): {task.eval_line(loss, trainer.last_val_accuracy)}")
    return 0
