"""What the test and the mount process say to each other: two signals, one answer line each.

SIGUSR1 cuts the power and is answered ``cut FILES BYTES NAMES``; SIGUSR2
powers on and is answered ``on``. The mount process says ``ready`` once,
when the filesystem is mounted.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

CUT_SIGNAL = signal.SIGUSR1
POWER_ON_SIGNAL = signal.SIGUSR2


@dataclass(frozen=True)
class CutReport:
    """What one power cut threw away."""

    dropped_files: int
    dropped_bytes: int
    undone_names: int

    def line(self) -> str:
        """The mount process's answer to :data:`CUT_SIGNAL`."""
        return f"cut {self.dropped_files} {self.dropped_bytes} {self.undone_names}\n"

    @classmethod
    def parse(cls, line: str) -> CutReport:
        """The report from an answer :meth:`line` wrote."""
        words = line.split()
        return cls(int(words[1]), int(words[2]), int(words[3]))
