"""A process's CPU time and state from /proc (Linux), for chaos reports, benchmarks and tests."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int | None, *, children: bool = True) -> float:
    """utime + stime of ``pid`` in seconds, plus its reaped children's with ``children``.

    0.0 for no pid or a process that is gone.
    """
    if pid is None:
        return 0.0
    try:
        # The command name may hold spaces or parentheses: split after the last ')'.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # utime, stime, cutime, cstime are fields 14–17 (1-based), 12–15 after the ')'
    ticks = fields[11:15] if children else fields[11:13]
    return sum(int(f) for f in ticks) / CLK_TCK


def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (``T``: stopped by a signal, ``Z``: a zombie);
    ``?`` for a process that is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    # The command name may hold spaces or parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[0]
