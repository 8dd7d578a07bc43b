"""Property (GEO.md scenario 5, agent side): SIGKILL at any moment never publishes a region
that is not already committed in the order's on-disk ``attempts``.

The real ``edge-agent`` command runs with two regions whose bridges never
answer, so it keeps failing over between them (every ``failover_after_s`` of
in-flight orders without receipts) while orders stream in over HTTP; it is
SIGKILLed at a random moment. Then, for every PUBLISH any broker delivered:
the receiving region is named in the attempts it carried, and those attempts
are a prefix of the order's on-disk ``regions`` (so the first name, the
authority, is the same everywhere, and nothing was published before its commit).

``GEO_SLOW=1`` runs more kills.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edge_agent._store import Store
from testrig.servers import MosquittoProcess

from .agent_process import AgentProcess
from .conftest import order_body
from .geo_rig import RegionBridge, never_answer

RUNS = 12 if os.environ.get("GEO_SLOW") else 2


def _submit_until(agent: AgentProcess, stop: threading.Event, acked: list[str]) -> None:
    i = 0
    while not stop.is_set():
        order_id = f"crash-{i:06d}"
        i += 1
        request = urllib.request.Request(
            f"{agent.url}/v1/orders",
            data=json.dumps(order_body(order_id)).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 202:
                    acked.append(order_id)
        except (urllib.error.URLError, OSError):
            return  # the agent was killed
        time.sleep(0.01)


def test_sigkill_never_publishes_an_uncommitted_region(
    tmp_path: Path,
    device_id: str,
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    home, other = mosquitto_factory(), mosquitto_factory()
    rng = random.Random()
    crossed = 0
    with (
        RegionBridge("home", home.url, never_answer) as at_home,
        RegionBridge("b", other.url, never_answer) as at_b,
    ):
        for run in range(RUNS):
            db = tmp_path / f"outbox-{run}.db"
            agent = AgentProcess(
                tmp_path,
                device_id=f"{device_id}-{run}",
                mqtt_url=home.url,
                db=db,
                failover_after_s=0.3,
                failback_probe_s=60,
                receipt_timeout_s=30,
            )
            agent.args += ["--region", f"home={home.url}", "--region", f"b={other.url}"]
            stop, acked = threading.Event(), list[str]()
            try:
                agent.start()
                submitter = threading.Thread(target=_submit_until, args=(agent, stop, acked))
                submitter.start()
                time.sleep(rng.uniform(0.4, 2.0))
                agent.sigkill()  # proves it: reaped with SIGKILL, port closed
                stop.set()
                submitter.join(10)
            finally:
                stop.set()
                agent.stop()
            time.sleep(0.3)  # what the brokers already had reaches the doubles

            store = Store(str(db), max_rows=10**6, max_bytes=10**9)
            assert store.open() is None
            try:
                for order_id in acked:
                    assert store.get(order_id) is not None, f"acknowledged {order_id} lost"
                for region, double in (("home", at_home), ("b", at_b)):
                    for order_id in double.ids():
                        on_disk = store.regions_of(order_id)
                        assert len(set(on_disk)) == len(on_disk), on_disk
                        for carried in double.carried(order_id):
                            assert region in carried, (order_id, region, carried)
                            assert on_disk[: len(carried)] == carried, (order_id, on_disk, carried)
                            crossed += len(carried) > 1
            finally:
                store.close()
            at_home.attempts.clear()
            at_b.attempts.clear()
            at_home.seen.clear()
            at_b.seen.clear()
    # The agent really moved between regions with orders in flight.
    assert crossed > 0
