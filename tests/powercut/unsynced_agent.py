"""``edge-agent`` with its outbox at ``synchronous=NORMAL``: the power-cut test's negative control.

In WAL mode, NORMAL commits without fsyncing the WAL (SQLite syncs it only at
a checkpoint), so a power cut takes the last commits with it, 202s and all.
Run as ``python -m tests.powercut.unsynced_agent`` with ``edge-agent``'s flags.
"""

from __future__ import annotations

import sys

from edge_agent._store import Store
from edge_agent.cli import main

if __name__ == "__main__":
    Store.synchronous = "NORMAL"
    sys.exit(main())
