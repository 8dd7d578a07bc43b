"""A planned Sentinel failover under load: what a receipt and a write without WAIT keep.

``SENTINEL FAILOVER`` promotes a replica at once and leaves the old master running
as a writable master until the Sentinels demote it (about 10 s later on Redis 7.0);
every write it takes meanwhile is discarded at the demotion (its resync from the new
master), and so is what a replica still attached to it received. A real
``order-bridge`` (``--redis-min-replicas 1``) takes orders from paho devices at a
steady rate, and a writer without WAIT (a Sentinel-managed redis-py client, as the
pipeline's health reports are written) INCRs a counter and counts the replies. Then:

- ``paused`` (the default form, about 13 s): :meth:`SentinelGroup.planned_failover` (writes
  paused on the old master, promotion, old master demoted at once, unpause), two
  replicas, ``min-replicas-to-write 1``: every receipted order is on the new master
  once, and every acknowledged INCR is in the counter there.
- ``plain-1-replica`` (``HA_SLOW=1``): bare ``SENTINEL FAILOVER``, one replica,
  ``min-replicas-to-write 1``: the replica's departure leaves the old master no
  replica, so WAIT gives no receipt there and other writes are refused
  (NOREPLICAS): every receipted order survives; the INCRs lost are counted.
- ``plain-2-replicas`` (``HA_SLOW=1``): bare ``SENTINEL FAILOVER`` with two replicas
  and ``min-replicas-to-write 1``: the second replica stays on the old master until
  the Sentinels move it, so WAIT 1 is met there; the test measures the loss.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

from testrig.sentinel import MASTER_NAME, SentinelGroup, role
from testrig.servers import MosquittoProcess
from tests.bridge.conftest import BridgeProcess, ReceiptCollector
from tests.bridge.failover_rig import Load, accepted, stream_order_ids
from tests.bridge.test_sentinel_failover import NOWHERE, sentinel_flags
from tests.helpers import wait_until_blocking
from tests.tools import require_tool

BridgeFactory = Callable[..., BridgeProcess]
SLOW = os.environ.get("HA_SLOW") == "1"
COUNTER = "orders:planned-failover-probe"
SLOW_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(not SLOW, reason="set HA_SLOW=1 (the bare SENTINEL FAILOVER forms, ~25 s)"),
]


class Counter:
    """INCRs ``COUNTER`` on the Sentinels' master in a loop; counts the acknowledged ones."""

    def __init__(self, group: SentinelGroup) -> None:
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [("127.0.0.1", s.port) for s in group.sentinels], socket_timeout=1.0
        )
        self._master: redis.Redis = self._sentinel.master_for(  # type: ignore[no-untyped-call]
            MASTER_NAME, socket_timeout=1.0
        )
        self.acked = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._master.incr(COUNTER)
            except (redis.RedisError, OSError):
                self.refused += 1
                time.sleep(0.01)
            else:
                self.acked += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._master.close()
        for sentinel in self._sentinel.sentinels:
            sentinel.close()


@pytest.mark.parametrize(
    ("procedure", "replicas"),
    [
        ("paused", 2),
        # The plain forms wait out the Sentinels' ~10 s demotion: about 20-25 s each.
        pytest.param("plain", 1, marks=SLOW_MARKS),
        pytest.param("plain", 2, marks=SLOW_MARKS),
    ],
    ids=["paused", "plain-1-replica", "plain-2-replicas"],
)
def test_planned_failover_under_load(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    procedure: str,
    replicas: int,
) -> None:
    require_tool("redis-server")
    broker = mosquitto_factory()
    receipts = ReceiptCollector(broker.url)
    load = Load(broker.url)
    with SentinelGroup(tmp_path / "sentinel", replicas=replicas, min_replicas_to_write=1) as group:
        old = group.master.port
        bridge = bridge_factory(
            broker.url, NOWHERE, *sentinel_flags(group),
            "--redis-min-replicas", "1", "--redis-replica-timeout-ms", "500",
            "--redis-timeout-s", "1", "--backoff-max-s", "0.2", "--batch-delay-ms", "2",
            "--trim-every-batches", "0",
        )  # fmt: skip
        bridge.start()
        counter = Counter(group)
        try:
            load.start()
            counter.start()
            wait_until_blocking(lambda: len(accepted(receipts)) >= 100, 30, "receipts before")
            acked_before = counter.acked
            failed_over = time.monotonic()
            if procedure == "paused":
                new = group.planned_failover()
            else:
                with redis.Redis(port=group.sentinels[0].port) as sentinel:
                    sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
                wait_until_blocking(
                    lambda: group.master_port() not in {None, old}, 30, "the replica promoted"
                )
                new = group.master_port() or 0
            assert role(new) == "master"
            wait_until_blocking(lambda: role(old) == "slave", 60, "the old master demoted")
            demoted_s = time.monotonic() - failed_over
            # Orders and INCRs flow to the new master (the old one's clients moved).
            settled = len(accepted(receipts))
            wait_until_blocking(
                lambda: len(accepted(receipts)) >= settled + 100, 60, "receipts after"
            )
            acked_mid = counter.acked
            wait_until_blocking(lambda: counter.acked > acked_mid + 50, 60, "INCRs after")
            load.stop()
            counter.stop()
            with redis.Redis(port=new) as master:
                in_streams = stream_order_ids(master)
                counted = int(master.get(COUNTER) or 0)
            receipted = accepted(receipts)
            lost = receipted - set(in_streams)
            twice = {oid: n for oid, n in in_streams.items() if n > 1}
            print(
                f"\nplanned failover ({procedure}, {replicas} replica(s)): old master demoted "
                f"{demoted_s:.1f} s after the failover began; {len(receipted)} receipted, "
                f"{len(lost)} lost, {len(twice)} twice; {counter.acked} INCRs acknowledged "
                f"({acked_before} before), {counter.acked - counted} lost, "
                f"{counter.refused} refused"
            )
            assert not twice, twice
            if (procedure, replicas) == ("plain", 2):
                return  # measured, not promised (the consistency table)
            assert not lost, f"receipted orders lost: {sorted(lost)[:10]}"
            if procedure == "paused":
                assert counted == counter.acked, "acknowledged writes lost"
        finally:
            counter.stop()
            load.close()
            receipts.close()
