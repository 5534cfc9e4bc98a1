"""CPU seconds of a process tree, from Linux's /proc: what the benchmarks and the scale
simulation charge to a server (the Prefect server, the registry, PostgreSQL)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["tree_cpu"]


def tree_cpu(pid: int) -> float | None:
    """CPU seconds used so far by ``pid`` and its live descendants, their reaped children
    included; None where there is no /proc or ``pid`` is gone."""
    if not Path("/proc/self/stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        # fields[1] is the ppid; [11:15] are utime, stime, cutime, cstime (stat fields 14-17).
        stats[int(entry.name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / tick)
    seen: set[int] = set()
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        if current in seen or current not in stats:
            continue
        seen.add(current)
        total += stats[current][1]
        frontier.extend(child for child, (ppid, _) in stats.items() if ppid == current)
    return total if seen else None
