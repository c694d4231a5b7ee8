"""Process-wide settings, applied by the ``moekit`` command line only (importing moekit changes nothing, and no
library function, core or lab, calls these): torch's thread count and glibc's malloc thresholds.

``set_threads(requested)``: ``train.threads`` (or ``moekit finetune --threads``) applied to this process; 0 (auto)
resolves with :func:`moekit.training.trainer.resolve_threads` (fewer threads on a busy machine).

``tune_malloc()``: on glibc, allocations above ``M_MMAP_THRESHOLD`` get fresh pages from the kernel on every call,
and every first touch of such a page faults. An MoE step allocates hundreds of MB of weight gradients and
activations per step, so on a CPU it pays those page faults each step (docs/ALGORITHMS.md section 17.4: writing
512 MB into fresh memory took ~144 ms against ~51 ms into mapped memory). Raising the mmap threshold and the trim
threshold keeps freed blocks in the heap for reuse. The cost: the process keeps its peak heap instead of returning it
to the OS, and glibc's heap fragments: blocks of a step's varying sizes are split and no longer fit the next step's,
so the heap grows by new pages step after step (max RSS of the default ``moekit train`` rose from 1.75 GB at 40 steps
to 2.5 GB at 160 with only ``tune_malloc``).

``trim_heap_every(interval_s)``: a daemon thread that calls glibc's ``malloc_trim(0)`` every ``interval_s`` seconds,
which hands the pages of every free block back to the kernel (``madvise``), the blocks staying in the heap. Resident
memory then stays near what the live tensors need, flat after warm-up, while the heap still serves every allocation
without ``mmap``; a trimmed page faults again on its next use, but only once per interval instead of on every
allocation (``benchmarks/train_tune_malloc.py`` measures tokens/s and max RSS of the three settings).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TRIM_INTERVAL_S", "set_threads", "stop_heap_trimmer", "train_run_with_threads", "trim_heap_every",
           "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False
_trimmer: threading.Thread | None = None

# Seconds between two malloc_trim calls of the command line's trimmer: long against the re-faulting a trim costs
# (tens of ms for the few hundred MB a step of the default model touches), short against the minutes a run takes.
TRIM_INTERVAL_S = 10.0


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep large freed blocks in glibc's heap (Linux/glibc only). Returns True if the settings were applied."""
    global _tuned
    if _tuned:
        return True
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)  # None: not Linux, or musl or another libc without mallopt
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _tuned = bool(ok)
    return _tuned


def trim_heap_every(interval_s: float = TRIM_INTERVAL_S) -> bool:
    """Start (once per process) a daemon thread that calls glibc's ``malloc_trim(0)`` every ``interval_s`` seconds:
    the pages of free heap blocks go back to the kernel, so resident memory stays flat however long the process
    trains (see the module docstring). Returns True if the thread runs (Linux/glibc only);
    :func:`stop_heap_trimmer` ends it."""
    global _trimmer
    if _trimmer is not None:
        return True
    if not interval_s > 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            trim(0)  # takes glibc's arena locks itself: safe while other threads allocate

    _trimmer = threading.Thread(target=loop, name="moekit-malloc-trim", daemon=True)
    _trimmer.stop = stop  # type: ignore[attr-defined]
    _trimmer.start()
    return True


def stop_heap_trimmer() -> None:
    """End the thread of :func:`trim_heap_every`, if one runs (tests; a process that stops training)."""
    global _trimmer
    if _trimmer is not None:
        _trimmer.stop.set()  # type: ignore[attr-defined]
        _trimmer.join()
        _trimmer = None


def set_threads(requested: int, log: Callable[[str], None] | None = None) -> int:
    """Set torch's intra-op thread count for this process: ``requested`` when > 0, else the automatic choice of
    :func:`~moekit.training.trainer.resolve_threads`. Returns the count now in effect. When the automatic choice
    takes fewer threads than the machine has cores, ``log`` is told why (one line)."""
    import torch

    from moekit.training.trainer import resolve_threads

    default = torch.get_num_threads()
    threads = resolve_threads(requested)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    cores = os.cpu_count() or default
    if requested == 0 and log is not None and threads < cores:
        try:
            load = f"the 1-minute load average is {os.getloadavg()[0]:.1f}, so other processes hold the rest"
        except (OSError, AttributeError):
            load = "torch's default for this process"
        log(f"threads: {threads} of {cores} cores (train.threads = 0, automatic: {load}; threads waiting on busy "
            f"cores run slower than fewer threads); --set train.threads=N chooses")
    return threads


def train_run_with_threads(run_config: Any, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`moekit.lab.training.run.train_run` after :func:`set_threads` of the run's ``train.threads`` (what
    ``moekit train`` and ``moekit compare`` do for each run; ``compare(..., train=train_run_with_threads)``); the
    thread count's reason goes to ``kwargs["log"]``."""
    from moekit.lab.training.run import read_run_config, train_run

    config = run_config if run_config is not None else read_run_config(Path(run_dir))
    log = kwargs.get("log")
    if log is None:
        set_threads(config.train.threads)
        return train_run(run_config, run_dir, **kwargs)
    # The thread count's reason is said with the run's first line, not before: a run refused at once (a bad path)
    # keeps its one-line error.
    pending: list[str] = []
    set_threads(config.train.threads, pending.append)

    def log_after_threads(msg: str) -> None:
        while pending:
            log(pending.pop(0))
        log(msg)

    return train_run(run_config, run_dir, **{**kwargs, "log": log_after_threads})
