"""Mosquitto's persistence file through a power cut: we do not rely on it, the agents resend.

The broker keeps its persistence file on the power-cut filesystem and queues
orders for the bridge's persistent session while the bridge is away. The power
is cut (unsynced writes dropped, Mosquitto SIGKILLed) and the broker restarts
on what survived; whatever its file lost, real ``edge-agent`` processes resend
every unreceipted order, and each lands in the streams exactly once.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis

from testrig.powercut import PowerCutMount
from testrig.servers import MosquittoProcess, RedisProcess, port_is_open
from tests.bridge.conftest import BridgeProcess, stream_entries
from tests.edge_agent.agent_process import AgentProcess
from tests.helpers import wait_until_blocking

from .conftest import needs_fuse

pytestmark = needs_fuse

DEVICES = 3
ORDERS_PER_DEVICE = 40
ORDER = {"currency": "EUR", "items": [{"sku": "cola", "qty": 1, "unit_price": 150}], "total": 150}


def _submit(agent: AgentProcess, order_id: str) -> None:
    request = urllib.request.Request(
        f"{agent.url}/v1/orders",
        data=json.dumps({**ORDER, "order_id": order_id}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202


def test_a_broker_power_cut_loses_nothing_the_agents_cannot_resend(
    tmp_path: Path,
    redis_factory: Callable[..., RedisProcess],
    bridge_factory: Callable[..., BridgeProcess],
) -> None:
    """Orders queued in a persistent broker's file survive its power cut via the agents."""
    store = redis_factory(appendonly=True)
    client = redis.Redis.from_url(store.url)
    agents: list[AgentProcess] = []
    with PowerCutMount(tmp_path / "disk") as disk:
        broker = MosquittoProcess(disk.path / "mosquitto", persistence=True)
        broker.start()
        try:
            bridge = bridge_factory(broker.url, store.url)
            bridge.start()
            assert bridge.terminate() == 0  # its session and subscription stay in the broker
            for n in range(DEVICES):
                agent = AgentProcess(
                    tmp_path, device_id=f"pcm-{n}", mqtt_url=broker.url, db=tmp_path / f"{n}.db"
                )
                agent.start()
                agents.append(agent)
            expected = set()
            for n, agent in enumerate(agents):
                for i in range(ORDERS_PER_DEVICE):
                    _submit(agent, f"pcm-{n}-{i:04d}")
                    expected.add(f"pcm-{n}-{i:04d}")
            time.sleep(1.5)  # the broker queues them for the bridge and autosaves (1 s)
            saved = disk.path / "mosquitto" / "mosquitto.db"
            # Waited for, not asserted at once: a starved broker can autosave late.
            wait_until_blocking(saved.exists, 30, "the broker's autosave (persistence written)")

            report = disk.cut()
            broker.kill()
            assert not port_is_open(broker.port)
            assert report.dropped_bytes + report.undone_names > 0, "the cut dropped nothing"
            disk.power_on()
            broker.start()

            again = bridge_factory(broker.url, store.url)
            again.argv[again.argv.index("--client-id") + 1] = bridge.client_id
            again.start()

            def streamed() -> Counter[str]:
                return Counter(e[b"order_id"].decode() for e in stream_entries(client))

            wait_until_blocking(lambda: set(streamed()) >= expected, 60, "every order landed")
            time.sleep(2.5)  # past the agents' receipt timeout: a double would show now
            counts = streamed()
            assert set(counts) == expected
            assert [oid for oid, n in counts.items() if n > 1] == []
        finally:
            for agent in agents:
                agent.stop()
            broker.kill()
            client.close()
