"""Figures as the bench prints them, and the table of recorded runs in docs/benchmarks.md."""

from __future__ import annotations

import math
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

RUNS_HEADING = "## Recorded runs"
RUNS_HEADER = ("| date (UTC) | commit | options | no-op ceiling /s | billing /s | ratio (spread) "
               "| p50 / p99 at half load | events / charge | actions / charge "
               "| CPU ms / charge (server, worker, simulator, bench) |")


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples; NaN when there are none."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def spread(values: Sequence[float], digits: int = 2) -> str:
    """``0.83 (0.80–0.86)``: the median, then the lowest and highest."""
    if not values:
        return "n/a"
    med = f"{median(values):.{digits}f}"
    if len(values) == 1:
        return med
    return f"{med} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def line(label: str, value: str) -> str:
    return f"{label}: {value}"


def seconds_pair(samples: Sequence[float]) -> str:
    """``p50 0.012 s, p99 0.250 s (n=420)``."""
    if not samples:
        return "no samples"
    return (f"p50 {percentile(samples, 50):.3f} s, p99 {percentile(samples, 99):.3f} s "
            f"(n={len(samples)})")


def git_commit(root: Path) -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, check=True, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def append_run(doc: Path, row: Sequence[str]) -> None:
    """Appends a row to the recorded-runs table of ``doc``, creating the table at the end of the
    file if it is not there yet."""
    text = doc.read_text() if doc.exists() else "# Benchmark figures\n"
    cells = "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |"
    lines = text.splitlines()
    if RUNS_HEADING not in lines:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [RUNS_HEADING, "", "Appended by `make bench BENCH_ARGS=--record`.", "",
                  RUNS_HEADER, "|" + "---|" * RUNS_HEADER.count(" | ") + "---|"]
        lines.append(cells)
    else:
        at = lines.index(RUNS_HEADING) + 1
        while at < len(lines) and not lines[at].startswith("|"):
            at += 1
        while at < len(lines) and lines[at].startswith("|"):
            at += 1
        lines.insert(at, cells)
    doc.write_text("\n".join(lines) + "\n")
