"""Running the arms of a reproduction study: one training run per (config, overrides) in its own directory, in
worker processes of one thread each, one tokenizer and one set of token arrays (prepared once, or by a first run)
copied into every run; and ``moekit distill`` runs of trained teachers the same way.

Finished runs (``summary.json``) are skipped, so a study that was interrupted continues where it stopped; an
unfinished run starts again from nothing (runs are minutes long). Imported by the scripts of ``benchmarks/repro``
as ``from _runs import ...``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_one(run_dir: str, config: str, overrides: list[str], data_src: str | None) -> dict:
    """Train ``config`` with ``overrides`` in ``run_dir`` (in this process, one thread) unless it finished before;
    return its summary, its per-step training records and the directory."""
    import torch

    from moekit.lab.training.run import train_run
    from moekit.lab.training.run_config import load_run_config
    from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE
    from moekit.training.metrics import read_metrics

    torch.set_num_threads(1)
    path = Path(run_dir)
    if not (path / "summary.json").is_file():
        if path.exists():
            shutil.rmtree(path)
        if data_src is not None:
            for name in (TOKENS_FILE, TOKENIZER_FILE):
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(data_src) / name, path / name)
        train_run(load_run_config(config, overrides), path, log=lambda m: None)
    return {
        "run_dir": run_dir,
        "summary": json.loads((path / "summary.json").read_text()),
        "records": [r for r in read_metrics(path / "metrics.jsonl") if "loss" in r],
    }


def prepare_shared_data(runs: Path, config: str, overrides: list[str]) -> Path:
    """Tokenise the corpus of ``config`` with ``overrides`` once into ``runs/data`` (reused when it is there and
    was prepared for the same [data] section) and return that folder, the ``data_src`` of :func:`run_all`. Every
    run then starts at once, instead of all waiting for a first run that trains on one core while it prepares the
    data (minutes on the 25 M-character mixed corpus)."""
    from moekit.lab.training.run_config import load_run_config
    from moekit.lab.training.tasks import prepare_data

    data = runs / "data"
    log(f"preparing the data in {data}")
    prepare_data(load_run_config(config, overrides), data, log)
    return data


def run_all(jobs: list[tuple[str, str, list[str]]], data_src: str | Path | None, workers: int) -> list[dict]:
    """``run_one`` for every ``(run_dir, config, overrides)`` of ``jobs``, ``workers`` at a time, in order."""
    ctx = multiprocessing.get_context("spawn")
    src = None if data_src is None else str(data_src)
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(run_one, *zip(*jobs, strict=True), [src] * len(jobs)))


def distill_one(run_dir: str, teacher_dir: str, options: dict) -> dict:
    """``moekit distill`` of the MoE run ``teacher_dir`` into ``run_dir`` (in this process, one thread) unless it
    finished before (``summary.json`` and ``distill.json``); ``options``: keyword arguments of ``distill_run``
    (``init``, ``hard_weight``, ``data_offset``, ``overrides``, ...). Returns its ``distill.json`` and the directory."""
    import torch

    from moekit.lab.distill.run import distill_run

    torch.set_num_threads(1)
    path = Path(run_dir)
    if not ((path / "summary.json").is_file() and (path / "distill.json").is_file()):
        if path.exists():  # an unfinished run of an interrupted study starts again
            shutil.rmtree(path)
        distill_run(teacher_dir, path, log=lambda m: None, **options)
    return {"run_dir": run_dir, "info": json.loads((path / "distill.json").read_text())}


def distill_all(jobs: list[tuple[str, str, dict]], workers: int) -> list[dict]:
    """``distill_one`` for every ``(run_dir, teacher_dir, options)`` of ``jobs``, ``workers`` at a time, in order."""
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(distill_one, *zip(*jobs, strict=True)))


def study_parser(doc: str, runs: str, seeds: int, steps: int) -> argparse.ArgumentParser:
    """The flags every study script takes: ``--out``, ``--runs``, ``--seeds``, ``--steps``, ``--jobs``, ``--corpus``,
    ``--max-chars`` and ``--section`` (defaults: the study's own ``runs`` folder, ``seeds`` and ``steps``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json, runs.csv, results.md and the plot")
    p.add_argument("--runs", default=runs, help="where the run directories go")
    p.add_argument("--seeds", type=int, default=seeds)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--corpus", default="mixed", help="data.corpus of every run (the studies': mixed)")
    p.add_argument("--max-chars", type=int, help="use only this many characters of the corpus (a quick trial)")
    p.add_argument("--section", help="write the RESULTS.md section from --out's results and exit")
    return p


def data_overrides(args: argparse.Namespace) -> list[str]:
    """The data overrides of a study's arguments (corpus, and ``data.max_chars`` for a quick trial)."""
    return [f"data.corpus='{args.corpus}'"] + ([] if args.max_chars is None else [f"data.max_chars={args.max_chars}"])


def study_main(parser: argparse.ArgumentParser, argv: list[str] | None, heading: str,
               study: Callable[[argparse.Namespace], dict], write: Callable[[dict, argparse.Namespace], None],
               prepare: Callable[[argparse.Namespace, argparse.ArgumentParser], None] | None = None) -> int:
    """A study script's ``main``: parse ``argv`` (the command line when None; kept as ``args.command``) and let
    ``prepare(args, parser)`` fill in derived values or reject combinations; with ``--section``, put --out's
    results.md (and --out's notes.md, a hand-written reading, when there is one) into that RESULTS.md under
    ``heading`` (its plots linked from there); otherwise run ``study(args)``
    and ``write(result, args)``."""
    from _report import replace_section, section_text

    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command = " ".join(argv)
    if prepare is not None:
        prepare(args, parser)
    if args.section:
        notes = Path(args.out) / "notes.md"  # a hand-written reading of the results, kept across reruns
        replace_section(Path(args.section), heading, section_text(Path(args.out), Path(args.section)),
                        notes if notes.is_file() else None)
        return 0
    with study_lock(Path(args.runs)):
        write(study(args), args)
    log(f"wrote {args.out}")
    return 0


@contextlib.contextmanager
def study_lock(runs: Path) -> Iterator[None]:
    """Hold ``runs/.study.lock`` (an exclusive ``flock``) while a study uses ``runs``. A run left unfinished is
    started again from nothing, so a second study process on the same folder would delete the run directories the
    first one is writing: it stops at once with one line instead."""
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / ".study.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise SystemExit(f"error: {runs} is in use by {holder}; wait for it or give another --runs") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}\n")
        fh.flush()
        yield
