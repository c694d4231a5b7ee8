"""Process-wide settings, applied by the ``moekit`` command line only (importing moekit changes nothing, and no
library function, core or lab, calls these): torch's thread count and glibc's malloc thresholds.

``set_threads(requested)``: ``train.threads`` (or ``moekit finetune --threads``) applied to this process; 0 (auto)
resolves with :func:`moekit.training.trainer.resolve_threads` (fewer threads on a busy machine).

``tune_malloc()``: on glibc, allocations above ``M_MMAP_THRESHOLD`` get fresh pages from the kernel on every call,
and every first touch of such a page faults. An MoE step allocates hundreds of MB of weight gradients and
activations per step, so on a CPU it pays those page faults each step (docs/ALGORITHMS.md section 17.4: writing
512 MB into fresh memory took ~144 ms against ~51 ms into mapped memory). Raising the mmap threshold and the trim
threshold keeps freed blocks in the heap for reuse. The cost: the process keeps its peak heap instead of returning it
to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["set_threads", "train_run_with_threads", "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep large freed blocks in glibc's heap (Linux/glibc only). Returns True if the settings were applied."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _tuned = bool(ok)
    return _tuned


def set_threads(requested: int) -> int:
    """Set torch's intra-op thread count for this process: ``requested`` when > 0, else the automatic choice of
    :func:`~moekit.training.trainer.resolve_threads`. Returns the count now in effect."""
    import torch

    from moekit.training.trainer import resolve_threads

    threads = resolve_threads(requested)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def train_run_with_threads(run_config: Any, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`moekit.lab.training.run.train_run` after :func:`set_threads` of the run's ``train.threads`` (what
    ``moekit train`` and ``moekit compare`` do for each run; ``compare(..., train=train_run_with_threads)``)."""
    from moekit.lab.training.run import read_run_config, train_run

    config = run_config if run_config is not None else read_run_config(Path(run_dir))
    set_threads(config.train.threads)
    return train_run(run_config, run_dir, **kwargs)
