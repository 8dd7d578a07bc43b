"""testrig.procstat: the one reader of a process's CPU time, checked against real processes."""

from __future__ import annotations

import subprocess
import sys

from testrig.procstat import process_cpu_s

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_a_busy_process_is_charged_its_cpu_and_a_gone_one_reads_zero() -> None:
    """A child that burns 0.3 CPU s reads at least that much while alive, 0.0 once reaped."""
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.3) + "input()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        while process_cpu_s(child.pid, children=False) < 0.3:
            assert child.poll() is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert process_cpu_s(child.pid) == 0.0
    assert process_cpu_s(None) == 0.0


def test_reaped_children_count_only_when_asked() -> None:
    """A parent that burns nothing itself is charged its reaped child's CPU with children."""
    grandchild = (
        f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN.format(s=0.3)!r}])"
    )
    parent = subprocess.Popen([sys.executable, "-c", grandchild + "; input()"],
                              stdin=subprocess.PIPE)  # fmt: skip
    try:
        while process_cpu_s(parent.pid) < 0.3:
            assert parent.poll() is None
        assert process_cpu_s(parent.pid, children=False) < 0.3
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait()
