"""Device health on v1/devices/{id}/health: reports, change triggers, the Will, the goodbye.

Against the session's real Mosquitto; a paho probe subscribes to the health topic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import schemas
from edge_agent import AgentConfig, EdgeAgent
from edge_agent.health import HealthReporter, backlog_level, short_text
from schemas.names import health_topic
from servicekit.version import package_version
from testrig.servers import MosquittoProcess
from tests.helpers import wait_until

from ..fleet.mqtt_probe import Probe
from .agent_process import AgentProcess
from .conftest import order_body


@pytest.fixture
def health_probe(mosquitto: MosquittoProcess, device_id: str) -> Iterator[Probe]:
    """A client subscribed to this test's device health topic."""
    with Probe(mosquitto.port) as probe:
        assert probe.subscribe(health_topic(device_id)).value < 128
        yield probe


def decoded(probe: Probe) -> list[schemas.Health]:
    """Every health message the probe has, decoded (a bad one fails the test)."""
    return [schemas.decode_health(bytes(m.payload)) for m in list(probe.messages)]


async def next_health(
    probe: Probe, predicate: Callable[[schemas.Health], bool], timeout_s: float = 10.0
) -> schemas.Health:
    """Wait for a health message matching ``predicate`` and return it."""
    found: list[schemas.Health] = []

    async def seen() -> bool:
        found[:] = [h for h in decoded(probe) if predicate(h)]
        return bool(found)

    await wait_until(seen, timeout_s, "a matching health message")
    return found[-1]


async def test_reports_figures_on_connect_and_on_a_backlog_not_on_each_order(
    make_config: Callable[..., AgentConfig], health_probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online at connect with an empty outbox; one unreceipted order is no news, a backlog
    of 10 (a new order of magnitude) is reported at once (issue 25)."""
    monkeypatch.setattr("edge_agent.health.CHECK_S", 0.05)
    config = make_config(http_enabled=False, health_interval_s=3600)
    async with EdgeAgent(config) as agent:
        first = await next_health(health_probe, lambda h: h.online)
        assert (first.outbox_depth, first.outbox_bytes, first.held) == (0, 0, 0)
        assert first.oldest_unreceipted_age_ms is None
        assert first.agent_version == package_version()
        before = time.time() * 1000
        await agent.submit(order_body())
        await asyncio.sleep(0.5)  # ten checks: a depth-crossing-zero trigger would have fired
        assert [h.outbox_depth for h in decoded(health_probe)] == [0]
        # No bridge: the orders stay unreceipted. The interval is an hour, so only
        # the change trigger (a backlog of 10) can send this one.
        for _ in range(9):
            await agent.submit(order_body())
        busy = await next_health(health_probe, lambda h: h.online and h.outbox_depth == 10)
        assert busy.outbox_bytes is not None
        assert busy.outbox_bytes > 0
        assert busy.oldest_unreceipted_age_ms is not None
        assert 0 <= busy.oldest_unreceipted_age_ms <= time.time() * 1000 - before + 1000
        assert agent.reporter.published.labels("change")._value.get() == 2
        assert agent.reporter.published.labels("interval")._value.get() == 0


@pytest.mark.parametrize(
    ("depth", "level"), [(0, 0), (1, 0), (9, 0), (10, 1), (99, 1), (100, 2), (12_345, 4)]
)
def test_backlog_level_is_the_depths_decade_from_ten(depth: int, level: int) -> None:
    assert backlog_level(depth) == level


async def test_reports_every_interval(
    make_config: Callable[..., AgentConfig], health_probe: Probe
) -> None:
    """With nothing changing, a report still comes every health_interval_s."""
    async with EdgeAgent(make_config(http_enabled=False, health_interval_s=0.3)) as agent:
        await wait_until(
            lambda: agent.reporter.published.labels("interval")._value.get() >= 2,
            what="two interval reports",
        )
    online = [h for h in decoded(health_probe) if h.online]
    assert len(online) >= 3  # the connect report and at least two interval ones


async def test_clean_stop_says_offline_with_figures(
    make_config: Callable[..., AgentConfig], health_probe: Probe
) -> None:
    """Leaving cleanly publishes online=False with the figures (the Will is discarded)."""
    async with EdgeAgent(make_config(http_enabled=False, health_interval_s=3600)) as agent:
        await next_health(health_probe, lambda h: h.online)
        await agent.submit(order_body())
        await wait_until(lambda: agent.outbox.store.pending_rows == 1, what="the order queued")
    last = await next_health(health_probe, lambda h: not h.online)
    assert last.outbox_depth == 1
    assert last.held == 0
    await asyncio.sleep(0.5)  # a Will would come now if the broker had kept it
    offline = [h for h in decoded(health_probe) if not h.online]
    assert len(offline) == 1, offline


async def test_sigkilled_agent_is_announced_by_its_will(
    tmp_path: Path, mosquitto: MosquittoProcess, device_id: str, health_probe: Probe
) -> None:
    """SIGKILL (proven): the broker publishes the Will, online=False at the connect time."""
    agent = AgentProcess(
        tmp_path, device_id=device_id, mqtt_url=mosquitto.url, db=tmp_path / "o.db",
        health_interval_s=3600,
    )  # fmt: skip
    before = int(time.time() * 1000)
    agent.start()
    try:
        await next_health(health_probe, lambda h: h.online)
        agent.sigkill()
        will = await next_health(health_probe, lambda h: not h.online)
    finally:
        agent.stop()
    assert before - 1000 <= will.at <= int(time.time() * 1000)
    assert will.outbox_depth is None
    assert will.agent_version is None


async def test_zero_interval_sends_nothing_and_sets_no_will(
    tmp_path: Path, mosquitto: MosquittoProcess, device_id: str, health_probe: Probe
) -> None:
    """health_interval_s = 0: no reports, and a SIGKILL leaves no Will behind."""
    agent = AgentProcess(
        tmp_path, device_id=device_id, mqtt_url=mosquitto.url, db=tmp_path / "o.db",
        health_interval_s=0,
    )  # fmt: skip
    agent.start()
    try:
        await asyncio.sleep(1.0)
        agent.sigkill()
        await asyncio.sleep(0.5)
    finally:
        agent.stop()
    assert health_probe.messages == []


async def test_a_failing_report_is_counted_and_the_agent_goes_on(
    make_config: Callable[..., AgentConfig], health_probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a report round is logged and counted; the loop and the agent live on."""
    failures = 0
    real = HealthReporter.snapshot

    async def flaky(self: HealthReporter, *, online: bool) -> schemas.Health:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("injected")
        return await real(self, online=online)

    monkeypatch.setattr(HealthReporter, "snapshot", flaky)
    monkeypatch.setattr("edge_agent.health.CHECK_S", 0.05)
    async with EdgeAgent(make_config(http_enabled=False, health_interval_s=3600)) as agent:
        await next_health(health_probe, lambda h: h.online)
        assert agent.metrics.loop_errors.labels("health")._value.get() == 2
        result = await agent.submit(order_body())
        assert not result.duplicate


def test_error_text_becomes_valid_short_text() -> None:
    """Control characters and length never make a health message invalid."""
    text = short_text("connection lost:\n\x1b[31m" + "x" * 400)
    assert "\n" not in text
    assert "\x1b" not in text
    assert len(text) == 256
    message = schemas.Health(v=1, online=True, at=1, last_broker_error=text)
    assert schemas.decode_health(schemas.encode(message)).last_broker_error == text


async def test_broker_errors_are_reported(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
    device_id: str,
) -> None:
    """A broker restart: the next report after reconnecting names the lost connection."""
    broker = mosquitto_factory()
    with Probe(broker.port) as first:
        assert first.subscribe(health_topic(device_id)).value < 128
        config = make_config(mqtt_url=broker.url, http_enabled=False, health_interval_s=3600)
        async with EdgeAgent(config) as agent:
            await next_health(first, lambda h: h.online)
            broker.restart()
            with Probe(broker.port) as second:
                assert second.subscribe(health_topic(device_id)).value < 128
                await agent.submit(order_body())  # a change, whenever the agent is back
                again: Any = await next_health(
                    second, lambda h: h.online and h.outbox_depth == 1, timeout_s=20
                )
    assert again.last_broker_error is not None
    assert again.last_broker_error.startswith("connection lost")
