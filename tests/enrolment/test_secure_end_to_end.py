"""The secure broker with the real bridge behind it: no device speaks for another, end to end."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from edge_agent import AgentConfig, EdgeAgent
from enrolment.dynsec import device_client_id
from enrolment.provision import Registry
from schemas import decode_receipt, encode
from schemas.names import DLQ_STREAM, orders_topic, receipts_topic, shard_of, stream_key
from tests.bridge.conftest import BridgeProcess
from tests.edge_agent.conftest import order_body
from tests.helpers import make_order, wait_until, wait_until_blocking

from .conftest import PASSWORDS, SecureBroker, probe

SHARDS = 4
NOT_AUTHORIZED = 135


def start_tls_bridge(broker: SecureBroker, redis_url: str, workdir: Path) -> BridgeProcess:
    """order-bridge logged in as `bridge` over TLS, trusting the test CA, ready."""
    url = f"mqtts://bridge:{PASSWORDS['bridge']}@localhost:{broker.server.port}"
    bridge = BridgeProcess(workdir, url, redis_url, "--mqtt-ca-file", str(broker.ca.cert))
    bridge.start()
    return bridge


@pytest.fixture
def tls_bridge(
    secure_broker: SecureBroker, redis_url: str, tmp_path: Path
) -> Iterator[BridgeProcess]:
    """order-bridge logged in as `bridge` over TLS, trusting the test CA."""
    bridge = start_tls_bridge(secure_broker, redis_url, tmp_path)
    yield bridge
    bridge.stop()


def test_spoofed_topic_and_payload_never_reach_a_stream(
    secure_broker: SecureBroker, tls_bridge: BridgeProcess, redis_url: str
) -> None:
    """kiosk-a: own order accepted; on kiosk-b's topic refused by the broker (135);
    claiming kiosk-b in its own topic's payload dead-lettered as device_mismatch."""
    assert tls_bridge.status("/readyz") == 200
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        device.subscribe(receipts_topic("kiosk-a"))
        assert (
            device.publish(orders_topic("kiosk-b"), encode(make_order("kiosk-b", 1)))
            == NOT_AUTHORIZED
        )
        assert device.publish(orders_topic("kiosk-a"), encode(make_order("kiosk-b", 2))) < 128
        assert device.publish(orders_topic("kiosk-a"), encode(make_order("kiosk-a", 3))) < 128
        receipts = [decode_receipt(m.payload) for m in device.wait_messages(2, timeout_s=15)]
    assert sorted((r.result, r.reason) for r in receipts) == [
        ("accepted", None),
        ("rejected", "device_mismatch"),
    ]
    with redis.Redis.from_url(redis_url) as client:
        streams = {shard: client.xrange(stream_key(shard)) for shard in range(SHARDS)}
        devices = [f[b"device_id"] for entries in streams.values() for _, f in entries]
        assert devices == [b"kiosk-a"]
        assert len(streams[shard_of("kiosk-a", SHARDS)]) == 1
        wait_until_blocking(lambda: client.xlen(DLQ_STREAM) == 1, 10, "DLQ entry")
        [(_, dead)] = client.xrange(DLQ_STREAM)
    assert dead[b"reason"] == b"device_mismatch"
    assert dead[b"topic"] == orders_topic("kiosk-a").encode()
    assert msgspec.msgpack.decode(dead[b"payload"])["device_id"] == "kiosk-b"


async def test_provisioned_agent_settles_orders_through_the_secure_broker(
    secure_broker: SecureBroker, redis_url: str, tmp_path: Path
) -> None:
    """The real edge agent, set up from nothing but its provisioned agent.toml (password,
    bound client id, CA), publishes through the broker's rules and gets its receipt."""
    registry = Registry(secure_broker.conf_dir)
    directory = registry.devices_dir / "kiosk-agent"
    registry.enrol(
        ["kiosk-agent"], broker_url=f"mqtts://localhost:{secure_broker.server.port}",
        ca=secure_broker.ca, install_dir=directory,
    )  # fmt: skip
    secure_broker.server.restart()  # the plugin reads its accounts at start
    bridge = start_tls_bridge(secure_broker, redis_url, tmp_path)
    settings = tomllib.loads((directory / "agent.toml").read_text())
    config = AgentConfig(**{**settings, "db": str(tmp_path / "outbox.db"), "http_enabled": False})
    assert config.mqtt_client_id == device_client_id("kiosk-agent")
    async with EdgeAgent(config) as agent:
        await agent.submit(order_body("secure-agent-0001"))

        async def accepted() -> bool:
            record = await agent.get("secure-agent-0001")
            return record is not None and record.state == "accepted"

        try:
            await wait_until(accepted, 30, "the receipt through the secure broker")
        finally:
            bridge.stop()
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(stream_key(shard_of("kiosk-agent", SHARDS)))
    assert [f[b"order_id"] for _, f in entries] == [b"secure-agent-0001"]
