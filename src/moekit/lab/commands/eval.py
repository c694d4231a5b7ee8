"""``moekit eval RUN_DIR``: validation loss and perplexity (test accuracy for an image classifier) of a run's
newest checkpoint that passes its checksum.

A checkpoint that fails is reported by file name and the previous one is used; if none passes, the command
fails.
"""

from __future__ import annotations

import argparse
import math
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run's checkpoint")
    p.add_argument("run_dir", help="a run directory written by moekit train")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the whole split)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from moekit.data.batches import TokenBatches
    from moekit.lab.training.run import load_trained_run
    from moekit.training.trainer import Trainer

    def report(msg: str) -> None:
        print(f"moekit eval: warning: {msg}", file=sys.stderr)

    run = load_trained_run(args.run_dir, fallback=True, warn=report, allow_vit=True)
    train_cfg = dataclasses.replace(run.config.train, eval_batches=args.batches, progress="off")
    if run.config.is_vit:
        from moekit.data.images import ImageBatches, ImageEvalData

        splits = run.data
        batches = ImageBatches(splits.train_images, splits.train_labels, 1, 0)
        trainer = Trainer(
            train_cfg,
            run.model,
            batches,
            ImageEvalData(splits.test_images, splits.test_labels),
            args.run_dir,
            log=report,
        )
        loss = trainer.evaluate()
        print(
            f"checkpoint {run.checkpoint.name} (step {run.step}): test accuracy {trainer.last_val_accuracy:.4f}, "
            f"loss {loss:.4f} nats/image"
        )
        return 0
    batches = TokenBatches(run.data.train_tokens, 1, run.config.data.seq_len, 0)
    trainer = Trainer(train_cfg, run.model, batches, run.data.val_tokens, args.run_dir, log=report)
    loss = trainer.evaluate()
    print(
        f"checkpoint {run.checkpoint.name} (step {run.step}): validation loss {loss:.4f} nats/token, "
        f"perplexity {math.exp(loss):.2f}"
    )
    return 0
