"""PUBACK reason codes: transient ones retry with backoff, definitive ones hold the order."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from edge_agent import AgentConfig, EdgeAgent
from edge_agent._puback import PubackAction, classify
from edge_agent._records import NewOrder
from edge_agent.outbox import Outbox, Sent
from edge_agent.transport import TransportHandlers, TransportSettings
from schemas import Receipt, decode_order, encode, names
from testrig.servers import MosquittoProcess
from tests.helpers import wait_until

from ..fleet.mqtt_probe import Probe
from .agent_process import AgentProcess
from .bridge_double import BridgeDouble
from .conftest import order_body


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (0x00, PubackAction.DELIVERED),
        (0x01, PubackAction.DELIVERED),
        (0x10, PubackAction.RETRY),  # no matching subscribers: dropped, no bridge there
        (0x80, PubackAction.RETRY),
        (0x83, PubackAction.RETRY),
        (0x91, PubackAction.RETRY),
        (0x97, PubackAction.RETRY),
        (0xA2, PubackAction.RETRY),  # unknown to us: may pass later
        (0x87, PubackAction.HOLD),
        (0x90, PubackAction.HOLD),
        (0x95, PubackAction.HOLD),
        (0x99, PubackAction.HOLD),
    ],
)
def test_reason_codes_are_classified(code: int, action: PubackAction) -> None:
    """Each PUBACK reason code maps to the behaviour of docs/explanation/edge-agent.md's table."""
    assert classify(code) is action


class ScriptedTransport:
    """A Transport double (our own seam): PUBACKs with scripted codes, receipts on success."""

    def __init__(self, settings: TransportSettings, handlers: TransportHandlers) -> None:
        self._handlers = handlers
        self._device = settings.client_id.removeprefix("edge-")
        self.codes: list[int] = []
        self.published: list[str] = []
        self._mid = 0
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def protocol(self) -> str:
        return "5"

    async def connect(self) -> bool:
        self._connected = True
        return False

    def publish(self, topic: str, payload: bytes, traceparent: str | None = None) -> int:
        self._mid += 1
        mid = self._mid
        if topic != names.orders_topic(self._device):
            return mid
        order = decode_order(payload)
        self.published.append(order.order_id)
        code = self.codes.pop(0) if self.codes else 0
        loop = asyncio.get_running_loop()
        loop.call_soon(self._handlers.on_puback, mid, code, f"code {code}")
        if code < 0x80:
            receipt = Receipt(v=1, order_id=order.order_id, result="accepted", reason=None, at=0)
            topic = names.receipts_topic(self._device)
            loop.call_soon(self._handlers.on_message, topic, encode(receipt))
        return mid

    async def disconnect(self) -> None:
        self._connected = False


async def test_transient_codes_retry_with_backoff_then_land(
    make_config: Callable[..., AgentConfig],
) -> None:
    """PUBACK 0x97 (quota exceeded) twice, then success: the order is resent and accepted."""
    transports: list[ScriptedTransport] = []

    def factory(settings: TransportSettings, handlers: TransportHandlers) -> ScriptedTransport:
        transport = ScriptedTransport(settings, handlers)
        transport.codes = [0x97, 0x80]
        transports.append(transport)
        return transport

    config = make_config(
        http_enabled=False, puback_retry_min_s=0.05, puback_retry_max_s=0.2, receipt_timeout_s=60
    )
    async with EdgeAgent(config, transport_factory=factory) as agent:
        await agent.submit(order_body("transient-01"))

        async def accepted() -> bool:
            rec = await agent.get("transient-01")
            return rec is not None and rec.state == "accepted"

        await wait_until(accepted, 20, "accepted after transient refusals")
        assert transports[0].published == ["transient-01"] * 3
        assert (await agent.health()).held == 0
        text = agent.metrics.render().decode()
        assert 'edge_broker_rejections_total{code="151"} 1.0' in text
        assert 'edge_broker_rejections_total{code="128"} 1.0' in text


async def test_held_orders_are_kept_not_sent_and_retried_only_inside_the_horizon(
    tmp_path: Path,
) -> None:
    """A held order is never due, expired or pruned; retry re-queues it unless past the horizon."""
    async with Outbox(str(tmp_path / "o.db")) as outbox:
        for oid in ("held-000001", "held-000002"):
            await outbox.submit(_new(outbox, oid))
        now = outbox.clock.now_ms()
        outbox.update(Sent("held-000001", now, now))
        outbox.update(Sent("held-000002", now, now - 10_000))
        outbox.hold("held-000001", "puback_135")
        outbox.hold("held-000002", "puback_135")
        await outbox.flush()
        assert outbox.store.held_rows == 2
        assert await outbox.due(now + 1, 10, set()) == []
        assert await outbox.expire(now + 1) == []
        await outbox.prune(10**15)
        assert (await outbox.get("held-000001")) is not None
        result = await outbox.retry_held(None, first_sent_after=now - 5_000)
        assert result.requeued == ["held-000001"]
        assert result.past_horizon == ["held-000002"]
        assert outbox.store.held_rows == 1
        assert [d.order_id for d in await outbox.due(now + 1, 10, set(), now - 5_000)] == [
            "held-000001"
        ]
        again = await outbox.retry_held(["held-000001", "nope-00000001"], now - 5_000)
        assert again.not_held == ["held-000001", "nope-00000001"]


def _publish_allowed(broker: MosquittoProcess) -> bool:
    """Whether the broker's ACL lets an anonymous client publish under v1/devices/ now."""
    with Probe(broker.port) as probe:
        return probe.publish(names.health_topic("acl-probe"), b"x") < 0x80  # 16: no reader


def _metric(text: str, name: str) -> int:
    """The value of an unlabelled sample in a Prometheus text exposition."""
    for line in text.splitlines():
        if match := re.fullmatch(rf"{name} (\S+)", line):
            return int(float(match[1]))
    raise AssertionError(f"no {name} in /metrics")


def _new(outbox: Outbox, order_id: str) -> NewOrder:
    return NewOrder(order_id, outbox.reserve_seq(), b"payload")


async def test_acl_mistake_holds_the_order_until_fixed_and_retried(
    tmp_path: Path, device_id: str, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    """ACL mistake → PUBACK 135 → held; ACL fixed + SIGHUP → `edge-agent retry` → lands once."""
    acl = tmp_path / "acl"
    acl.write_text("topic read v1/devices/#\n")  # the mistake: devices may not publish
    broker = mosquitto_factory(extra_conf=f"acl_file {acl}")
    agent = AgentProcess(tmp_path, device_id=device_id, mqtt_url=broker.url, db=tmp_path / "o.db")
    agent.start()
    try:
        with BridgeDouble(broker.url) as double:
            async with aiohttp.ClientSession(agent.url) as http:
                async with http.post("/v1/orders", json=order_body("acl-held-0001")) as resp:
                    assert resp.status == 202

                async def held() -> bool:
                    async with http.get("/v1/orders/acl-held-0001") as resp:
                        return bool((await resp.json())["state"] == "held")

                await wait_until(held, 20, "order held after PUBACK 135")
                async with http.get("/v1/orders/acl-held-0001") as resp:
                    assert (await resp.json())["reason"] == "puback_135"
                async with http.get("/healthz") as resp:
                    health = await resp.json()
                assert health["held"] == 1
                assert "135" in health["last_broker_rejection"]
                async with http.get("/metrics") as resp:
                    assert "edge_orders_held 1.0" in await resp.text()
                await asyncio.sleep(1.0)  # held: no resend, not even after receipt timeouts
                assert double.seen["acl-held-0001"] == 0
                async with http.post("/v1/orders/acl-held-0001/retry", json={}) as resp:
                    # Still wrong: the retry is taken, and the broker's refusal holds it again.
                    assert (await resp.json())["requeued"] == ["acl-held-0001"]
                await wait_until(held, 20, "held again while the ACL is still wrong")

                assert not await asyncio.to_thread(_publish_allowed, broker)  # the probe sees it
                acl.write_text("topic readwrite v1/devices/#\n")
                await asyncio.to_thread(broker.reload)  # SIGHUP: Mosquitto re-reads the ACL
                # A busy broker may take longer than any fixed wait to re-read it, and
                # a retry before that is held again: probe until the fix is in force.
                await wait_until(
                    lambda: asyncio.to_thread(_publish_allowed, broker), 10, "the fixed ACL applied"
                )
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edge_agent.cli", "retry", "--held",
                    "--http-port", str(agent.port),
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await proc.communicate()
                assert proc.returncode == 0
                assert json.loads(out)["requeued"] == ["acl-held-0001"]

                async def accepted() -> bool:
                    async with http.get("/v1/orders/acl-held-0001") as resp:
                        return bool((await resp.json())["state"] == "accepted")

                await wait_until(accepted, 20, "accepted after the fix")
                await asyncio.sleep(0.5)
                # Landed once: the refused sends never reached the bridge. Only a receipt
                # slower than the 2 s timeout (a starved machine) may add a resend.
                async with http.get("/metrics") as resp:
                    timeouts = _metric(await resp.text(), "edge_receipt_timeouts_total")
                assert 1 <= double.seen["acl-held-0001"] <= 1 + timeouts
                async with http.get("/healthz") as resp:
                    assert (await resp.json())["held"] == 0
                async with http.post("/v1/orders/acl-held-0001/retry", json={}) as resp:
                    assert resp.status == 409
                    assert resp.content_type == "application/problem+json"
                    assert (await resp.json())["reason"] == "not_held"
                async with http.post("/v1/orders/unknown-00001/retry", json={}) as resp:
                    assert resp.status == 404
        assert agent.sigterm() == 0
    finally:
        agent.stop()
