"""Fault tests against real processes: SIGKILL of the agent, broker restarts, receipts.

Broker refusals (PUBACK codes) are in test_held.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from edge_agent import AgentConfig, EdgeAgent
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import wait_until

from .agent_process import AgentProcess
from .bridge_double import BridgeDouble
from .conftest import order_body


async def _post_until_dead(url: str, acked: set[str], prefix: str, workers: int = 16) -> None:
    """Post orders from concurrent workers until the agent stops answering; record 202s."""
    counter = itertools.count()

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            order_id = f"{prefix}-{next(counter):06d}"
            try:
                async with session.post("/v1/orders", json=order_body(order_id)) as resp:
                    if resp.status == 202:
                        acked.add(order_id)
            except (aiohttp.ClientError, OSError):
                return

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))


@pytest.mark.parametrize("kill_after_s", [0.05, 0.4, 1.0])
async def test_sigkill_loses_no_acknowledged_order(
    tmp_path: Path, device_id: str, mqtt_url: str, bridge: BridgeDouble, kill_after_s: float
) -> None:
    """SIGKILL of the agent under load loses no 202'd order; the restarted agent sends them all."""
    db = tmp_path / "outbox.db"
    agent = AgentProcess(tmp_path, device_id=device_id, mqtt_url=mqtt_url, db=db)
    agent.start()
    acked: set[str] = set()
    try:
        load = asyncio.create_task(_post_until_dead(agent.url, acked, "kill"))
        await wait_until(lambda: bool(acked), 20, "first 202")
        await asyncio.sleep(kill_after_s)  # counted from the first 202: orders are flowing
        await asyncio.to_thread(agent.sigkill)
        await asyncio.wait_for(load, 10)
        assert acked, "no order was acknowledged before the kill"
        restarted = AgentProcess(
            tmp_path, device_id=device_id, mqtt_url=mqtt_url, db=db, port=agent.port
        )
        restarted.start()
        try:
            missing = await asyncio.to_thread(bridge.wait_for, acked, 60)
            assert not missing, (
                f"{len(missing)} of {len(acked)} acknowledged orders never arrived:\n"
                f"{restarted.log_tail()}"
            )

            async def all_settled() -> bool:
                async with (
                    aiohttp.ClientSession(restarted.url) as session,
                    session.get("/healthz") as resp,
                ):
                    health = await resp.json()
                return bool(health["outbox_depth"] == 0)

            await wait_until(all_settled, 30, "outbox drained after restart")
            assert '"session_present": true' in restarted.log_tail(200)  # persistent session
            assert restarted.sigterm() == 0
        finally:
            restarted.stop()
    finally:
        agent.stop()


async def test_sigterm_exits_cleanly(tmp_path: Path, device_id: str, mqtt_url: str) -> None:
    """SIGTERM stops the agent with exit code 0 and keeps every 202'd order."""
    db = tmp_path / "outbox.db"
    agent = AgentProcess(tmp_path, device_id=device_id, mqtt_url=mqtt_url, db=db)
    agent.start()
    try:
        async with aiohttp.ClientSession(agent.url) as session:
            for i in range(5):
                async with session.post("/v1/orders", json=order_body(f"term-{i:04d}")) as resp:
                    assert resp.status == 202
        assert await asyncio.to_thread(agent.sigterm) == 0
        assert "agent_stopped" in agent.log_tail()
    finally:
        agent.stop()
    async with EdgeAgent(
        AgentConfig(device_id=device_id, mqtt_url=mqtt_url, db=str(db), http_enabled=False)
    ) as reopened:
        rows, _ = await reopened.list_orders(limit=10)
    assert {r.order_id for r in rows} == {f"term-{i:04d}" for i in range(5)}


async def test_broker_restart_without_persistence_loses_nothing(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """Orders flowing while a non-persistent broker is killed and restarted all reach the bridge."""
    broker = mosquitto_factory(persistence=False)
    config = make_config(mqtt_url=broker.url, http_enabled=False)
    total = 300
    ids = [f"flow-{i:05d}" for i in range(total)]
    with BridgeDouble(broker.url) as double:
        async with EdgeAgent(config) as agent:

            async def submit_all() -> None:
                for order_id in ids:
                    await agent.submit(order_body(order_id))
                    await asyncio.sleep(0.003)

            flow = asyncio.create_task(submit_all())
            await wait_until(lambda: len(double.ids()) >= 50, 20, "first orders")
            await asyncio.to_thread(broker.kill)
            assert not broker.running
            assert not port_is_open(broker.port)
            await asyncio.sleep(0.5)  # intake keeps working while the broker is down
            assert not agent.publisher.connected
            await asyncio.to_thread(broker.start)
            await flow
            missing = await asyncio.to_thread(double.wait_for, set(ids), 60)
            assert not missing, f"{len(missing)} orders never reached the bridge"

            async def settled() -> bool:
                return (await agent.health()).outbox_depth == 0

            await wait_until(settled, 30, "every order settled by receipt")
            assert agent.metrics.connects._value.get() >= 2  # prometheus has no public getter
            assert sorted(double.seqs[i] for i in ids) == [double.seqs[i] for i in ids]


async def test_no_receipt_means_resend(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """A PUBACK alone settles nothing: without a receipt the order is resent after the timeout."""
    config = make_config(receipt_timeout_s=0.3, http_enabled=False)
    # Swallow the first two sightings, then accept: only receipts settle.
    with BridgeDouble(mqtt_url, lambda _oid, n: None if n < 3 else ("accepted", None)) as double:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("resend-0001"))

            async def settled() -> bool:
                rec = await agent.get("resend-0001")
                return rec is not None and rec.state == "accepted"

            await wait_until(settled, 20, "settled after resends")
            assert double.seen["resend-0001"] >= 3
            rec = await agent.get("resend-0001")
            assert rec is not None
            assert rec.sends >= 3


async def test_rejected_receipt_stops_retrying(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """A ``rejected`` receipt stores its reason and the order is never sent again."""
    config = make_config(receipt_timeout_s=0.3, http_enabled=False)
    with BridgeDouble(mqtt_url, lambda _oid, _n: ("rejected", "conflict")) as double:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("reject-0001"))

            async def rejected() -> bool:
                rec = await agent.get("reject-0001")
                return rec is not None and rec.state == "rejected"

            await wait_until(rejected, 20, "rejected")
            sightings = double.seen["reject-0001"]
            await asyncio.sleep(1.0)  # three receipt timeouts: a retry would show now
            assert double.seen["reject-0001"] == sightings
            rec = await agent.get("reject-0001")
            assert rec is not None
            assert rec.reason == "conflict"


async def test_rate_limited_receipt_retries_later(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """``rejected``/``rate_limited`` defers the order; it is sent again and then settles."""
    config = make_config(rate_limited_retry_s=0.2, receipt_timeout_s=10, http_enabled=False)

    def policy(_oid: str, n: int) -> tuple[str, str | None]:
        return ("rejected", "rate_limited") if n == 1 else ("accepted", None)

    with BridgeDouble(mqtt_url, policy) as double:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("ratelim-001"))

            async def settled() -> bool:
                rec = await agent.get("ratelim-001")
                return rec is not None and rec.state == "accepted"

            await wait_until(settled, 20, "settled after rate limit")
            assert double.seen["ratelim-001"] == 2


async def test_status_updates_local_state(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """A pipeline Status on the device's status topic shows up in the order's local state."""
    with BridgeDouble(mqtt_url, send_status=True):
        async with EdgeAgent(make_config(http_enabled=False)) as agent:
            await agent.submit(order_body("status-0001"))

            async def confirmed() -> bool:
                rec = await agent.get("status-0001")
                return rec is not None and rec.status == "confirmed"

            await wait_until(confirmed, 20, "status confirmed")


async def test_submit_cli(tmp_path: Path, device_id: str, mqtt_url: str) -> None:
    """``edge-agent submit`` posts an order from a shell and exits 0, or 2 on bad input."""
    agent = AgentProcess(tmp_path, device_id=device_id, mqtt_url=mqtt_url, db=tmp_path / "o.db")
    agent.start()
    try:
        base = ["-m", "edge_agent.cli", "submit", "--http-port", str(agent.port)]
        good = json.dumps(order_body("cli-000001"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *base, good, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert json.loads(out)["order_id"] == "cli-000001"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *base, "{}", stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        assert proc.returncode == 2
        assert json.loads(err)["status"] == 422
    finally:
        with contextlib.suppress(Exception):
            agent.sigterm()
        agent.stop()


async def test_port_in_use_is_a_clear_error(tmp_path: Path, device_id: str, mqtt_url: str) -> None:
    """An intake port already taken ends the command with exit 1 and a reason, not a traceback."""
    first = AgentProcess(tmp_path, device_id=device_id, mqtt_url=mqtt_url, db=tmp_path / "a.db")
    first.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent.cli", "--device-id", device_id,
            "--mqtt-url", mqtt_url, "--db", str(tmp_path / "b.db"),
            "--http-port", str(first.port),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        assert proc.returncode == 1
        assert '"reason": "http_bind"' in err.decode()
        assert "Traceback" not in err.decode()
    finally:
        first.stop()
