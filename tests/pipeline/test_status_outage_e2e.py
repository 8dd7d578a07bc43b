"""End to end: a device and the broker away while its orders are processed still learns every
terminal status afterwards, through the status query (real agent, bridge, worker, Mosquitto)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from edge_agent import AgentConfig, EdgeAgent
from pipeline.config import PipelineConfig
from pipeline.records import order_statuses
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import wait_until

from ..bridge.conftest import BridgeProcess, bridge_factory  # noqa: F401  (a fixture)
from .conftest import TEST_SHARDS
from .processes import env_for, spawn, stop_all

ORDERS = 20
BODY = {"currency": "EUR", "items": [{"sku": "COLA-33", "qty": 1, "unit_price": 150}], "total": 150}


def events(log: Path, event: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines of one event."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            found.append(json.loads(line))
    return found


async def test_statuses_shed_during_a_broker_outage_reach_the_device_by_status_query(  # noqa: PLR0917 - fixtures
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: Callable[..., BridgeProcess],  # noqa: F811
    config: PipelineConfig,
    aredis: Any,
    catalog: dict[str, int],
    tmp_path: Path,
    device_id: str,
) -> None:
    """20 orders accepted by a real bridge; the broker is SIGKILLed (port closed); a worker with
    a backlog of 1 status processes them all anyway and sheds 39 of the 40 statuses; the
    broker comes back (empty: no persistence) and the agent, whose status query the worker
    answers, ends with all 20 fulfilled."""
    broker = mosquitto_factory(persistence=False)
    bridge = bridge_factory(broker.url, config.redis_url)
    bridge.start()
    agent_config = AgentConfig(
        device_id=device_id, mqtt_url=broker.url, db=str(tmp_path / "outbox.db"),
        http_enabled=False, receipt_timeout_s=2.0, reconnect_min_s=0.05, reconnect_max_s=0.5,
        poll_interval_s=0.2, status_query_delay_s=0.5, status_query_max_interval_s=1.0,
    )  # fmt: skip
    log = tmp_path / "worker.log"
    workers: list[subprocess.Popen[bytes]] = []
    async with EdgeAgent(agent_config) as agent:
        ids = [(await agent.submit(BODY)).order_id for _ in range(ORDERS)]

        async def all_accepted() -> bool:
            rows, _ = await agent.list_orders(state="accepted", limit=100)
            return len(rows) == ORDERS

        await wait_until(all_accepted, what="every order accepted by the bridge")
        await asyncio.to_thread(broker.kill)
        assert not port_is_open(broker.port)
        try:
            cfg = msgspec.structs.replace(config, mqtt_url=broker.url, status_backlog_max=1)
            workers.append(spawn(["worker"], env_for(cfg, log_level="info"), log))

            async def all_processed() -> bool:
                refs = [(device_id, order_id) for order_id in ids]
                return set(await order_statuses(aredis, refs, shards=TEST_SHARDS)) == {"fulfilled"}

            await wait_until(all_processed, what="every order processed with the broker down")
            assert not port_is_open(broker.port)  # still down: nothing reached the device
            for order_id in ids:
                record = await agent.get(order_id)
                assert record is not None
                assert record.status is None
            # The worker commits a batch's records to Redis before it hands the batch's
            # statuses to the publisher, which logs the shedding: wait for the line.
            await wait_until(lambda: bool(events(log, "status_backlog_full")),
                             what="the worker logging status_backlog_full")  # fmt: skip
            await asyncio.to_thread(broker.start)

            async def all_fulfilled() -> bool:
                rows, _ = await agent.list_orders(state="fulfilled", limit=100)
                return len(rows) == ORDERS

            await wait_until(all_fulfilled, what="every terminal status at the device")
            answered = sum(int(e["answered"]) for e in events(log, "status_query_answered"))
            # At most one status was in the backlog: the rest came by status query.
            assert answered >= ORDERS - 1
            assert workers[0].poll() is None
        finally:
            stop_all(workers)
