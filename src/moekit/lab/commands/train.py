"""``moekit train``: train a (MoE) language model from a TOML config; with no arguments, the default Switch-style
model on the built-in corpus. Prints where the run directory is and how the model compares to a unigram
model.

SIGTERM (a scheduler's stop) and SIGINT (Ctrl-C) stop training cleanly: the step in progress finishes, a checkpoint
of that step is written, the command prints where it is and how to resume (``moekit train --resume RUN_DIR``), and
exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a process killed by it would. A second
signal while the checkpoint is written stops at once (the earlier checkpoints stay intact)."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from moekit.lab.commands import add_overrides, add_tune_malloc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a language model or ViT (default: switch-tiny LM on the built-in corpus)")
    p.add_argument("--config", default=None, help="TOML config file, or a name from configs/ (default: switch-tiny)")
    add_overrides(p, "override one config value (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--run-dir", default=None, help="where to write the run (default: runs/<config>-<time>)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest valid checkpoint",
    )
    add_tune_malloc(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.errors import MoekitError
    from moekit.lab.runtime import train_run_with_threads
    from moekit.lab.training.run import StopSignals, TrainingInterrupted, default_run_dir
    from moekit.lab.training.run_config import DEFAULT_CONFIG_NAME, load_run_config

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.resume:
        if args.config or args.run_dir:
            raise MoekitError("--resume takes the config and run directory from RUN_DIR; drop --config / --run-dir")
        run_dir = Path(args.resume)
        run_config = None
        if args.overrides:  # only [train] and [parallel] values may change on resume (e.g. a larger max_steps)
            bad = [o for o in args.overrides if not o.strip().startswith(("train.", "parallel."))]
            if bad:
                raise MoekitError(f"--resume accepts only train.* and parallel.* overrides, got {bad[0]!r}")
            from moekit.lab.training.run import read_run_config
            from moekit.lab.training.run_config import build_run_config, layout_for_launch, parse_overrides
            from moekit.training.distributed import launch_world_size

            saved = read_run_config(run_dir)
            tables = saved.resolved()
            parsed = parse_overrides(args.overrides)
            tables["train"].update(parsed.get("train", {}))
            given = parsed.get("parallel", {})
            tables["parallel"].update(given)
            # The layout is the launch's (a checkpoint reshards to any layout whose ep divides E); a degree given
            # with --set is kept and the other one follows from the number of processes.
            layout = layout_for_launch(saved, launch_world_size(), data_parallel=given.get("data_parallel"),
                                       expert_parallel=given.get("expert_parallel"))
            tables["parallel"].update(data_parallel=layout.data_parallel, expert_parallel=layout.expert_parallel)
            if "fsdp" not in given:  # a run trained with FSDP resumes on one process without it
                tables["parallel"]["fsdp"] = layout.fsdp
            run_config = build_run_config(tables)
        resume = True
    else:
        config_name = args.config or DEFAULT_CONFIG_NAME
        from moekit.lab.training.run_config import find_named_config

        source = args.config if args.config else find_named_config(DEFAULT_CONFIG_NAME)
        run_config = load_run_config(source, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(Path(config_name).stem)
        resume = False
    with StopSignals() as stop:
        try:
            summary = train_run_with_threads(run_config, run_dir, resume=resume, log=log, stop=stop)
        except TrainingInterrupted as exc:
            print(f"moekit train: {exc}; nothing new was saved in {run_dir}", file=sys.stderr)
            return 128 + exc.signum
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # tear down together, so no rank destroys its group while a peer still exchanges
        dist.destroy_process_group()
    if "stopped_at" in summary:
        # Under expert parallelism a rank that did not get the signal itself stopped with the others: report
        # SIGTERM for it (the signal a scheduler sends to every rank).
        signum = stop.signum if stop.signum is not None else signal.SIGTERM
        if summary.get("is_main", True):
            print(
                f"moekit train: stopped by {signal.Signals(signum).name} at step {summary['steps']}; checkpoint: "
                f"{summary['stopped_at']}\nresume with: moekit train --resume {shlex.quote(str(run_dir))}",
                file=sys.stderr,
            )
        return 128 + int(signum)
    if not summary.get("is_main", True):  # expert parallelism: rank 0 reports
        return 0
    from moekit.lab.training.tasks import task_for_arch

    line = task_for_arch(summary["arch"]).result_line(summary)
    if line is not None:
        print(line)
    if summary["skipped_steps"]:
        print(f"skipped steps (non-finite): {summary['skipped_steps']}, roll-backs: {summary['rollbacks']}")
    print(f"run directory: {summary['run_dir']}")
    return 0
