"""The secure broker with the real bridge behind it: no device speaks for another, end to end."""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from edge_agent import AgentConfig, EdgeAgent
from enrolment.cli import main as order_enrol
from enrolment.dynsec import DEVICE_ROLE_PREFIX, device_client_id
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


async def test_orders_held_by_a_rights_mistake_land_once_after_the_fix_and_a_remote_retry(
    secure_broker: SecureBroker, redis_url: str, tmp_path: Path
) -> None:
    """A device role hand-edited without its orders right holds the real agent's order
    (135); `order-enrol rights` and a broker restart fix it, and `order-pipeline devices
    retry-held` over TLS with the pipeline's account releases it: it lands exactly once."""
    registry = Registry(secure_broker.conf_dir)
    directory = registry.devices_dir / "kiosk-held"
    registry.enrol(
        ["kiosk-held"], broker_url=f"mqtts://localhost:{secure_broker.server.port}",
        ca=secure_broker.ca, install_dir=directory,
    )  # fmt: skip
    mistaken = msgspec.json.decode(registry.accounts_path.read_bytes())
    for role in mistaken["roles"]:
        if role["rolename"] == f"{DEVICE_ROLE_PREFIX}kiosk-held":
            role["acls"] = [a for a in role["acls"] if a["topic"] != orders_topic("kiosk-held")]
    registry.accounts_path.write_bytes(msgspec.json.encode(mistaken))
    secure_broker.server.restart()
    bridge = start_tls_bridge(secure_broker, redis_url, tmp_path)
    settings = tomllib.loads((directory / "agent.toml").read_text())
    config = AgentConfig(**{
        **settings, "db": str(tmp_path / "outbox.db"), "http_enabled": False,
        "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
    })  # fmt: skip
    try:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("secure-held-0001"))

            async def state_is(state: str) -> bool:
                record = await agent.get("secure-held-0001")
                return record is not None and record.state == state

            await wait_until(lambda: state_is("held"), 30, "held by the broker's refusal")
            assert order_enrol(["--registry", str(registry.root), "rights"]) == 0
            await asyncio.to_thread(secure_broker.server.restart)
            await wait_until(lambda: agent.publisher.connected, 30, "the agent back")
            assert await state_is("held")  # nothing is resent without the command
            url = f"mqtts://pipeline:{PASSWORDS['pipeline']}@localhost:{secure_broker.server.port}"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pipeline.cli", "devices", "retry-held", "kiosk-held",
                "--mqtt-url", url, "--mqtt-ca-file", str(secure_broker.ca.cert),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
            assert proc.returncode == 0, out
            assert json.loads(out)["result"] == "delivered"
            await wait_until(lambda: state_is("accepted"), 30, "accepted after the command")
    finally:
        bridge.stop()
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(stream_key(shard_of("kiosk-held", SHARDS)))
    assert [f[b"order_id"] for _, f in entries] == [b"secure-held-0001"]
