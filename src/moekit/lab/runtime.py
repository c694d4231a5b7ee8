"""Process-level performance settings, all opt-in (importing moekit changes nothing).

``tune_malloc()``: on glibc, allocations above ``M_MMAP_THRESHOLD`` get fresh pages from the kernel on every call,
and every first touch of such a page faults. An MoE step allocates hundreds of MB of weight gradients and
activations per step, so on a CPU it pays those page faults each step (PERFORMANCE.md: writing 512 MB into fresh
memory took ~144 ms against ~51 ms into mapped memory). Raising the mmap threshold and the trim threshold keeps
freed blocks in the heap for reuse. The cost: the process keeps its peak heap instead of returning it to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_malloc"]

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
