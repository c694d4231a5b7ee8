"""What every reproduction script in ``benchmarks/repro`` shares: the 95 % t interval of a mean over seeds, and
writing its section of docs/RESULTS.md (paragraphs wrapped like the rest of the file, the section replaced in
place or appended, its plot linked from there).

Imported by the scripts as ``from _report import ...`` (a script's own folder is first on ``sys.path`` when it is
run; scripts loaded another way put it there first).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import textwrap
from pathlib import Path
from typing import Any

from moekit.atomic import atomic_write_text

# Two-sided 95 % Student t quantiles by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
WIDTH = 118


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (nan for a single value: no interval)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def wrap_markdown(lines: list[str]) -> str:
    """``lines`` joined, paragraphs wrapped at RESULTS.md's width; tables, code, images, headings and command lines
    stay one line each."""
    wrapped: list[str] = []
    for line in lines:
        if line.startswith(("|", "```", "!", "#", "python")) or len(line) <= WIDTH:
            wrapped.append(line)
        else:
            wrapped.extend(textwrap.wrap(line, WIDTH, break_long_words=False, break_on_hyphens=False))
    return "\n".join(wrapped)


def replace_section(results_md: Path, heading: str, section: str, notes: Path | None = None) -> None:
    """Put ``section`` (starting with its ``heading`` line) into ``results_md``: in place of the section with that
    heading (which the next ``## `` heading ends), or at the end; a missing file is created. ``notes``: a
    hand-written markdown file appended to the section."""
    if notes is not None:
        section = section.rstrip("\n") + "\n\n" + notes.read_text(encoding="utf-8").strip("\n") + "\n"
    text = results_md.read_text(encoding="utf-8") if results_md.is_file() else ""
    start = text.find("\n" + heading + "\n")
    start = start + 1 if start >= 0 else (0 if text.startswith(heading + "\n") else -1)
    if start < 0:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    atomic_write_text(results_md, text)


def section_text(out: Path, results_md: Path, plot: str | None = None) -> str:
    """``out``'s results.md with its images (``](name.png)``: files of ``out``; only ``plot`` when given) linked from
    where ``results_md`` lies."""
    text = (out / "results.md").read_text(encoding="utf-8")

    def relink(m: re.Match) -> str:
        name = m.group(1)
        if plot is not None and name != plot:
            return m.group(0)
        return "](" + Path(os.path.relpath((out / name).resolve(), results_md.resolve().parent)).as_posix() + ")"

    return re.sub(r"\]\(([^()/\s]+\.png)\)", relink, text)


def write_outputs(out: Path, result: dict, stats: dict, markdown: str, rows: list[dict] | None = None) -> None:
    """A study's files in ``out``: results.json (``result`` and ``stats``), runs.csv (``rows``, one line each, the
    columns of the first) and results.md, each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"result": result, "stats": stats}, indent=1, default=str)
    atomic_write_text(out / "results.json", data + "\n")
    if rows:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out / "runs.csv", buf.getvalue())
    atomic_write_text(out / "results.md", markdown)


def verdict(mean: float, half: float, paper_side: int) -> str:
    """The reading of a paired difference's 95 % interval ``mean ± half`` against the paper's side (``-1``: the
    paper expects it below zero, ``+1``: above)."""
    return verdict_of_interval(mean - half, mean + half, paper_side)


def verdict_of_interval(low: float, high: float, paper_side: int) -> str:
    """:func:`verdict` for any interval ``[low, high]`` (e.g. a bootstrap percentile interval); nan bounds read as
    not resolved."""
    if paper_side not in (-1, 1):
        raise ValueError(f"paper_side must be -1 or +1, got {paper_side}")
    if math.isnan(low) or math.isnan(high):
        return "not resolved at this scale"
    if (high < 0 and paper_side < 0) or (low > 0 and paper_side > 0):
        return "reproduced"
    if (high < 0 and paper_side > 0) or (low > 0 and paper_side < 0):
        return "contradicted"
    return "not resolved at this scale"


def count_verdict(p: float, difference: int, paper_side: int) -> str:
    """The reading of a count comparison (Fisher's exact test, two-sided ``p``; ``difference``: the arm's count
    minus the baseline's) against the paper's side (``-1``: the paper expects fewer, ``+1``: more)."""
    if p >= 0.05 or difference == 0:
        return "not resolved at this scale"
    return "reproduced" if (difference > 0) == (paper_side > 0) else "contradicted"


def plot_runs(ax: Any, curves: dict[str, list[tuple[int, float]]], colours: dict[str, str], labels: dict[str, str],
              unigram: float | None) -> None:
    """Every run's training cross-entropy on ``ax`` (``curves``: ``"arm/seed"`` -> ``(step, loss)`` points), one
    colour per arm, a log scale so that a divergence shows whole, and the unigram line."""
    for key, curve in curves.items():
        ax.plot([s for s, _ in curve], [x for _, x in curve], color=colours[key.split("/")[0]], lw=0.6, alpha=0.6)
    for arm, colour in colours.items():
        ax.plot([], [], color=colour, label=f"{labels[arm]} (one line per seed)")
    if unigram is not None:
        ax.axhline(unigram, color="black", ls="--", lw=1, label="unigram (validation)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (nats / token, log scale)")
    ax.legend()
