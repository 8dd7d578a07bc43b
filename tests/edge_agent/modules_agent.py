"""``edge-agent`` that writes the names of its loaded modules to ``$AGENT_MODULES_OUT`` at exit."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from edge_agent.cli import main


def _write_modules() -> None:
    Path(os.environ["AGENT_MODULES_OUT"]).write_text("\n".join(sorted(sys.modules)))


if __name__ == "__main__":
    atexit.register(_write_modules)
    sys.exit(main(sys.argv[1:]))
