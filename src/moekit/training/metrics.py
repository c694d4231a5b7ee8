"""Training metrics: one JSON object per line in ``metrics.jsonl``, and a progress display.

The log's byte length is stored in every checkpoint, and the log is fsynced there; a resumed run truncates the log
to it, so the log of an interrupted-and-resumed run holds exactly the lines of a run that was never interrupted. A
log shorter than that (lines lost) is never padded: the gap is reported and the log continues after it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

__all__ = ["MetricsLog", "Progress", "load_cv", "max_violation", "read_metrics"]


def max_violation(loads: Sequence[float]) -> float:
    """``max load / mean load`` of one layer's experts (1 = perfect balance; Wang et al. 2024's "MaxVio" plus 1);
    0 when no expert got anything."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 0.0


def load_cv(loads: Sequence[float]) -> float:
    """Coefficient of variation of one layer's expert loads (population standard deviation / mean); 0 when empty."""
    mean = sum(loads) / len(loads)
    if mean <= 0:
        return 0.0
    return math.sqrt(sum((x - mean) ** 2 for x in loads) / len(loads)) / mean


def _clean(value: Any) -> Any:
    # JSON has no NaN / Infinity: write them as strings so every line stays standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSON-lines log with an explicit flush before checkpoints.

    ``truncate_to``: the log's length recorded in the checkpoint a run resumes from. A longer log (lines written
    after that checkpoint) is cut back to it. A shorter one (lines lost, e.g. a file restored from a backup) is
    never extended: ``truncate`` would pad it with NUL bytes, which no JSON reader accepts. It is kept as it is
    (less a torn last line), and ``report`` is told which steps are missing. ``at_step``: the checkpoint's step,
    for that message.
    """

    def __init__(
        self,
        path: str | Path,
        truncate_to: int | None = None,
        *,
        at_step: int | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        if truncate_to is not None and self.path.exists():
            with open(self.path, "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                if size >= truncate_to:
                    f.truncate(truncate_to)
                else:
                    _drop_torn_line(f)
                    if report is not None:
                        report(_gap_message(self.path, size, truncate_to, at_step))
        elif truncate_to and report is not None:  # the whole log is gone
            report(_gap_message(self.path, 0, truncate_to, at_step))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def flush(self, sync: bool = False) -> int:
        """Flush (with ``sync``, to disk: at each checkpoint) and return the file's length in bytes."""
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def _drop_torn_line(f: BinaryIO) -> None:
    """Cut a last line without its newline (a process killed mid-write), so the next record starts a line. Only
    on the rare path of a log that lost lines, so reading it whole is fine."""
    f.seek(0)
    data = f.read()
    if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)


def _gap_message(path: Path, size: int, expected: int, at_step: int | None) -> str:
    steps = [r["step"] for r in read_metrics(path) if isinstance(r.get("step"), int)]
    last = max(steps) if steps else 0
    upto = f"{at_step}" if at_step is not None else "the checkpoint"
    missing = f"steps {last + 1}-{upto}" if at_step is None or at_step > last + 1 else f"step {upto}"
    return (
        f"{path} is shorter than at the checkpoint ({size} of {expected} bytes): the records of {missing} are "
        "missing; the log is kept as it is (not padded) and continues after them"
    )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a killed process is ignored)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Progress:
    """A one-line bar with ETA on a terminal; plain lines (one per call) otherwise; or nothing ("off")."""

    def __init__(
        self, total: int, mode: str = "auto", stream: TextIO | None = None, start_step: int = 0
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode
        self.total = total
        self.start_step = start_step
        self.t0 = time.perf_counter()

    def update(self, step: int, text: str) -> None:
        if self.mode == "off":
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        eta_s = f"{eta:4.0f}s" if math.isfinite(eta) else "  ?s"
        if self.mode == "bar":
            width = 24
            filled = int(width * step / max(1, self.total))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text} eta {eta_s} ")
        else:
            self.stream.write(f"step {step}/{self.total} {text} eta {eta_s}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.mode == "off":
            return
        if self.mode == "bar":
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()
