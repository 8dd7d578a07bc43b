"""Property: the outbox acknowledges an order only after its transaction committed.

A process writing the outbox is SIGKILLed at a random moment; every order it
acknowledged must be in the file when it is opened again. A SIGKILL keeps the
page cache, so this shows that the acknowledgement (the 202) comes after the
commit returned, and nothing about fsync: ``synchronous=OFF`` would pass it
too. That the commit is on the disk is tests/powercut/test_agent_outbox.py's
job (the power-cut filesystem drops what was not fsynced).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent._store import Store
from servicekit.clock import now_ms

REPO = Path(__file__).resolve().parents[2]

# The child acknowledges an order (prints it) only after Outbox.submit returned,
# exactly where the HTTP intake answers 202.
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from edge_agent.outbox import Outbox
    from tests.edge_agent.test_outbox import submit

    async def main(path: str, workers: int) -> None:
        async with Outbox(path) as outbox:
            async def worker(w: int) -> None:
                i = 0
                while True:
                    order_id = f"crash-{w:02d}-{i:06d}"
                    i += 1
                    result = await submit(outbox, order_id)
                    sys.stdout.write(f"{order_id} {result.seq}\\n")
                    sys.stdout.flush()
                    if i % 5 == 0:
                        outbox.settle(order_id, "accepted", None)
            print("ready", flush=True)
            await asyncio.gather(*(worker(w) for w in range(workers)))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


@settings(max_examples=8, deadline=None)
@given(kill_after_s=st.floats(0.0, 0.4), workers=st.integers(1, 32))
def test_every_acknowledged_order_was_committed_before_its_ack(
    kill_after_s: float, workers: int
) -> None:
    """Whenever the writer is SIGKILLed, every order it acknowledged is committed in the file."""
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "outbox.db")
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, db, str(workers)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(kill_after_s)
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
        acked = [line.split() for line in child.stdout.read().splitlines() if " " in line]
        child.stdout.close()

        store = Store(db, max_rows=10**7, max_bytes=10**10)
        assert store.open() is None
        try:
            for order_id, seq in acked:
                record = store.get(order_id)
                assert record is not None, f"{order_id} acknowledged before its commit"
                assert record.seq == int(seq)
            stats = store.stats()
            unsettled = {d.order_id for d in store.due(now_ms(), 10**7, frozenset())}
            assert stats.pending_rows == len(unsettled)
            # The next order continues the sequence after everything stored.
            assert all(int(seq) < store._next_seq for _, seq in acked)
        finally:
            store.close()
