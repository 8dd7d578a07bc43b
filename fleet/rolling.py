"""The ``rolling-upgrade`` chaos kind: every bridge replica, then every pipeline worker, in turn.

A rolling upgrade's moves without the new release: each bridge replica is
stopped with SIGTERM (it writes and receipts what it holds), started again on
the same port and client id, and waited for until ``/healthz`` is 200; then
each pipeline worker process is sent SIGTERM (it finishes and acks its batch)
and the next waits until the supervisor has started its replacement. Inside
fleet-sim both sides run this tree's version: the old release is not
installed there. ``tests/upgrade/`` runs the same order of moves from the
previous tagged release (docs/how-to/upgrade.md).
"""

from __future__ import annotations

import os
import signal
import time

from testrig.services import pid_alive

from .errors import ChaosError
from .stack import Stack

WORKER_BACK_TIMEOUT_S = 60.0
POLL_S = 0.05


def rolling_restart(stack: Stack) -> str:
    """Restart each bridge replica, then each worker, one at a time; what happened, for the log.

    Raises:
        ChaosError: a worker's replacement did not start within the timeout.
    """
    moves: list[str] = []
    for bridge in stack.bridges:
        before = bridge.pid
        bridge.stop()
        gone = before is not None and not pid_alive(before)
        bridge.start()  # waits until ready
        moves.append(f"{bridge.name} {before} {'gone' if gone else 'ALIVE'}, now {bridge.pid}")
    for index, before in enumerate(stack.worker_pids()):
        os.kill(before, signal.SIGTERM)
        moves.append(f"worker {before} {_replaced(stack, before, index)}")
    return f" ({'; '.join(moves)})"


def _replaced(stack: Stack, before: int, index: int) -> str:
    """Wait until ``before`` is gone and the supervisor runs all its workers again."""
    want = stack.settings.workers
    deadline = time.monotonic() + WORKER_BACK_TIMEOUT_S
    while time.monotonic() < deadline:
        now = stack.worker_pids()
        if not pid_alive(before) and before not in now and len(now) >= want:
            new = sorted(set(now) - {before})
            return f"gone, {len(new)} running"
        time.sleep(POLL_S)
    raise ChaosError(f"worker {index} (pid {before}) was not replaced within "
                     f"{WORKER_BACK_TIMEOUT_S:g} s")  # fmt: skip
