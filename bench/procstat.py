"""CPU time of processes (and their descendants) read from /proc: no psutil needed.

``/proc/<pid>/stat`` fields 14 and 15 (utime, stime) are the CPU time a process has used so
far, in clock ticks (usually 1/100 s). A process's figure here is its own plus that of its
living descendants, so a wrapper that starts the real server is measured whole. Children that
exited meanwhile are lost (their time reaches the parent's cutime only once reaped): the bench
measures long-lived processes only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_stat(text: str) -> tuple[int, float]:
    """(parent pid, CPU seconds) from the text of /proc/<pid>/stat. The command name (field 2)
    may hold spaces and parentheses, so fields are counted from its last ')'."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field n is rest[n - 3]
    ppid = int(rest[1])
    utime, stime = int(rest[11]), int(rest[12])
    return ppid, (utime + stime) / TICKS


def _all_stats() -> dict[int, tuple[int, float]]:
    stats: dict[int, tuple[int, float]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return stats


def tree_cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process and its living descendants, less
    the descendants that are named themselves."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(pid)
    others = set(roots.values())
    result: dict[str, float] = {}
    for name, root in roots.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                total += stats[pid][1]
            # another named process (the bench's children) is measured on its own
            todo.extend(c for c in children.get(pid, []) if c not in others)
        result[name] = total
    return result


@dataclass
class CpuWindow:
    """CPU seconds each process used between ``start()`` and ``stop()``."""

    roots: dict[str, int]
    started: dict[str, float] | None = None
    used: dict[str, float] | None = None

    def start(self) -> None:
        self.started = tree_cpu_seconds(self.roots)

    def stop(self) -> dict[str, float]:
        assert self.started is not None, "stop() before start()"
        now = tree_cpu_seconds(self.roots)
        self.used = {name: now[name] - self.started[name] for name in self.roots}
        return self.used
