"""One trace per order, end to end: real agent, bridge and pipeline, a real OTLP receiver.

Every service runs as its own process (``edge-agent``, ``order-bridge``,
``order-pipeline worker``) against the test Mosquitto and Redis, with
``--otlp-endpoint`` pointing at :class:`OtlpReceiver`, which decodes the
``ExportTraceServiceRequest`` protobufs the OpenTelemetry SDK sends.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from schemas.names import DLQ_STREAM, TRACE_STREAM_FIELD
from servicekit import tracing
from tests.bridge.conftest import BridgeProcess, bridge_factory, stream_entries
from tests.edge_agent.agent_process import AgentProcess
from tests.helpers import wait_until_blocking
from tests.pipeline.processes import env_for, spawn, stop_all

from .otlp_receiver import OtlpReceiver, ReceivedSpan

__all__ = ["bridge_factory"]  # the fixture, re-used from the bridge tests

SHARDS = 4  # BridgeProcess runs --shards 4
APP_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STEPS = ("validate", "reserve", "pay", "fulfil")
ORDER = {
    "currency": "EUR",
    "items": [{"sku": "COLA-33", "qty": 1, "unit_price": 150}],
    "total": 150,
}


@dataclass(frozen=True)
class Services:
    """Where the test's broker and Redis are, and the agent's device id."""

    mqtt_url: str
    redis_url: str
    device_id: str


@pytest.fixture
def services(mqtt_url: str, redis_url: str, device_id: str) -> Services:
    """The test's broker, its (flushed) Redis and the device id."""
    return Services(mqtt_url, redis_url, device_id)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver; the services' span batches leave every 100 ms."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture
def catalog(redis_url: str) -> None:
    """The one SKU the orders buy, in stock."""

    async def load() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            items = {"COLA-33": CatalogItem(price=150, stock=100)}
            await store_catalog(client, Catalog(items=items, currency="EUR"), shards=SHARDS)
        finally:
            await client.aclose()

    asyncio.run(load())


@pytest.fixture
def pipeline(
    redis_url: str, mqtt_url: str, receiver: OtlpReceiver, tmp_path: Path, catalog: None
) -> Iterator[subprocess.Popen[bytes]]:
    """One ``order-pipeline worker`` process exporting its spans."""
    config = PipelineConfig(
        redis_url=redis_url, mqtt_url=mqtt_url, shards=SHARDS, block_ms=50,
        otlp_endpoint=receiver.endpoint, log_level="info",
    )  # fmt: skip
    process = spawn(["worker"], env_for(config), tmp_path / "pipeline.log")
    yield process
    stop_all([process])


@pytest.fixture
def agent(
    tmp_path: Path, mqtt_url: str, receiver: OtlpReceiver, device_id: str
) -> Iterator[AgentProcess]:
    """An ``edge-agent`` process with tracing on at 100 % (not started yet)."""
    process = AgentProcess(
        tmp_path, device_id=device_id, mqtt_url=mqtt_url, db=tmp_path / "outbox.db",
        otlp_endpoint=receiver.endpoint, trace_sample_ratio=1.0,
    )  # fmt: skip
    yield process
    process.stop()


def submit(agent: AgentProcess, headers: dict[str, str] | None = None) -> str:
    """POST the order to the agent's intake; its order_id."""
    request = urllib.request.Request(
        f"{agent.url}/v1/orders",
        data=json.dumps(ORDER).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        return str(json.loads(response.read())["order_id"])


def local_state(agent: AgentProcess, order_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{agent.url}/v1/orders/{order_id}", timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def wait_fulfilled(agent: AgentProcess, order_id: str, timeout_s: float = 30.0) -> None:
    wait_until_blocking(
        lambda: local_state(agent, order_id)["status"] == "fulfilled",
        timeout_s,
        f"order {order_id} fulfilled (agent log:\n{agent.log_tail()})",
    )


def stored_trace(redis_url: str, order_id: str) -> str:
    """The ``trace`` field of the order's one stream entry."""
    with redis.Redis.from_url(redis_url) as client:
        entries = [e for e in stream_entries(client, SHARDS) if e[b"order_id"] == order_id.encode()]
    assert len(entries) == 1, f"{len(entries)} stream entries for {order_id}"
    return entries[0][TRACE_STREAM_FIELD.encode()].decode()


def one(spans: list[ReceivedSpan], name: str, **where: str) -> ReceivedSpan:
    found = [
        s for s in spans if s.name == name and all(getattr(s, k) == v for k, v in where.items())
    ]
    assert len(found) == 1, f"{len(found)} spans {name!r} {where}: {found}"
    return found[0]


def assert_pipeline_continues(spans: list[ReceivedSpan], trace_id: str, parent_id: str) -> None:
    """Each step and the status publish: order-pipeline spans, children of the stream's context."""
    steps = [one(spans, f"pipeline {step}", trace_id=trace_id) for step in STEPS]
    for span in steps:
        assert span.service == "order-pipeline"
        assert span.parent_id == parent_id
        assert span.kind == "INTERNAL"
    assert [s.start_ns for s in steps] == sorted(s.start_ns for s in steps)
    published = [s for s in spans if s.name == "status publish" and s.trace_id == trace_id]
    assert published, "no status publish span"
    assert all(s.parent_id == parent_id and s.kind == "PRODUCER" for s in published)
    assert "fulfilled" in ",".join(s.attributes["statuses"] for s in published)


def test_one_trace_per_order_across_every_hop_and_through_a_bridge_sigkill(
    receiver: OtlpReceiver,
    agent: AgentProcess,
    pipeline: subprocess.Popen[bytes],
    bridge_factory: Callable[..., BridgeProcess],
    services: Services,
) -> None:
    """Both halves share the processes (starting them is most of the time).

    1. App → intake → publish → bridge batch (linked) → pipeline steps → status publish.
    2. The bridge dies (SIGKILL); the agent resends; the new bridge and the
       pipeline stay in the order's trace.
    """
    bridge = bridge_factory(services.mqtt_url, services.redis_url,
                            "--otlp-endpoint", receiver.endpoint)  # fmt: skip
    bridge.start()
    agent.start()
    every_hop(receiver, agent, services)
    bridge.kill()
    through_a_bridge_sigkill(receiver, agent, services, bridge, bridge_factory)


def every_hop(receiver: OtlpReceiver, agent: AgentProcess, services: Services) -> None:
    """Each hop's span is there, with the right parent, kind, service and links."""
    order_id = submit(agent, {"traceparent": APP_TRACEPARENT})
    wait_fulfilled(agent, order_id)
    trace_id = tracing.trace_id(APP_TRACEPARENT)
    names = ["order intake", "order publish", "bridge batch", "status publish"]
    spans = receiver.wait(trace_id, *names, *(f"pipeline {s}" for s in STEPS))

    intake = one(spans, "order intake")
    assert (intake.service, intake.kind) == ("edge-agent", "SERVER")
    assert intake.trace_id == trace_id
    assert intake.parent_id == APP_TRACEPARENT[36:52]  # the app's span
    assert intake.attributes["order.id"] == order_id

    publish = one(spans, "order publish")
    assert (publish.service, publish.kind) == ("edge-agent", "PRODUCER")
    assert publish.trace_id == trace_id
    assert publish.parent_id == intake.span_id
    assert publish.attributes["outcome"] == "accepted"
    assert publish.end_ns >= publish.start_ns

    # The MQTT user property carried the publish span's context to the stream.
    assert stored_trace(services.redis_url, order_id) == f"00-{trace_id}-{publish.span_id}-01"

    batch = one(spans, "bridge batch")
    assert (batch.service, batch.kind) == ("order-bridge", "CONSUMER")
    assert batch.trace_id != trace_id  # a batch is its own trace, linked to its orders
    assert batch.parent_id == ""
    (link,) = [link for link in batch.links if link.trace_id == trace_id]
    assert link.span_id == publish.span_id
    assert link.attributes == {"order.id": order_id, "device.id": services.device_id}

    assert_pipeline_continues(spans, trace_id, publish.span_id)


def through_a_bridge_sigkill(
    receiver: OtlpReceiver,
    agent: AgentProcess,
    services: Services,
    killed: BridgeProcess,
    bridge_factory: Callable[..., BridgeProcess],
) -> None:
    """An order sent while the bridge is dead is resent and stays one trace.

    The killed bridge's session keeps queueing at the broker, so every send of
    the order waits there; the agent's receipt timeout (2 s) resends it. The
    new replica (same client id) gets every copy: one is appended, the others
    are ``duplicate`` (the traceparent differs per send, but it is not part
    of the dedup digest), never ``conflict``.
    """
    order_id = submit(agent)  # no header: the intake starts the trace
    intakes = receiver.wait_any("order intake", lambda s: s.attributes["order.id"] == order_id)
    (intake,) = intakes
    trace_id = intake.trace_id
    assert intake.parent_id == ""

    def resent() -> bool:
        sends = [s for s in receiver.trace(trace_id) if s.name == "order publish"]
        return any(s.attributes["outcome"] == "receipt_timeout" for s in sends)

    wait_until_blocking(resent, 20, "a send that timed out waiting for its receipt")
    second = bridge_factory(services.mqtt_url, services.redis_url,
                            "--otlp-endpoint", receiver.endpoint)  # fmt: skip
    second.with_args("--client-id", killed.client_id, "--share-group", f"g-{killed.client_id}")
    second.start()
    wait_fulfilled(agent, order_id)
    names = ["bridge batch", "status publish", *(f"pipeline {s}" for s in STEPS)]
    spans = receiver.wait(trace_id, *names)

    sends = sorted(
        (s for s in spans if s.name == "order publish" and s.trace_id == trace_id),
        key=lambda s: s.start_ns,
    )
    assert len(sends) >= 2
    assert all(s.parent_id == intake.span_id for s in sends)
    assert sends[0].attributes["outcome"] == "receipt_timeout"
    assert any(s.attributes["outcome"] == "accepted" for s in sends)

    stored = stored_trace(services.redis_url, order_id)  # exactly one entry
    assert tracing.trace_id(stored) == trace_id
    assert stored[36:52] in {s.span_id for s in sends}
    with redis.Redis.from_url(services.redis_url) as client:
        assert client.xlen(DLQ_STREAM) == 0  # no `conflict` for the resends
    batches = receiver.linked_to(trace_id)
    assert {b.service for b in batches} == {"order-bridge"}
    assert stored[36:52] in {link.span_id for b in batches for link in b.links}
    assert_pipeline_continues(spans, trace_id, stored[36:52])
