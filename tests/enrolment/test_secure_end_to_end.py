"""The secure broker with the real bridge behind it: no device speaks for another, end to end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from edge_agent import AgentConfig, EdgeAgent
from enrolment.cli import main as order_enrol
from enrolment.dynsec import DEVICE_ROLE_PREFIX, device_client_id
from enrolment.provision import Registry
from schemas import decode_receipt, encode
from schemas.names import (
    DLQ_STREAM,
    orders_topic,
    receipts_topic,
    shard_of,
    status_topic,
    stream_key,
)
from testrig.servers import RedisProcess, free_port
from testrig.services import child_pids
from tests.bridge.conftest import BridgeProcess
from tests.edge_agent.conftest import order_body
from tests.helpers import make_order, wait_until, wait_until_blocking
from tests.pipeline.processes import spawn, stop_all

from .conftest import PASSWORDS, REPO, SecureBroker, probe

SHARDS = 4
NOT_AUTHORIZED = 135


def start_tls_bridge(broker: SecureBroker, redis_url: str, workdir: Path) -> BridgeProcess:
    """order-bridge logged in as `bridge` over TLS, trusting the test CA, ready."""
    password = secret_file(workdir / "secrets", "bridge-mqtt", PASSWORDS["bridge"])
    url = f"mqtts://bridge@localhost:{broker.server.port}"
    bridge = BridgeProcess(
        workdir, url, redis_url, "--mqtt-ca-file", str(broker.ca.cert),
        "--mqtt-password-file", str(password),
    )  # fmt: skip
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


def secret_file(directory: Path, name: str, secret: str) -> Path:
    """``secret`` on one line in a 0600 file, as a secrets store mounts it."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def cmdline(pid: int) -> str:
    """What every local user reads of a process's arguments (``ps``)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_services_read_passwords_from_files_and_keep_them_out_of_argv(
    secure_broker: SecureBroker,
    redis_factory: Callable[..., RedisProcess],
    tmp_path: Path,
) -> None:
    """The real bridge and pipeline (API and a worker process) run under --production with
    every password read from a file: they log in to the secure broker and an ACL Redis (an
    order gets its receipt and status), and no process's /proc/PID/cmdline or log holds a
    password."""
    acl = (REPO / "redis-acl/users.acl").read_text().replace(">change-me-", ">test-")
    (tmp_path / "users.acl").write_text(acl)
    acl_redis = redis_factory(extra_args=("--aclfile", str(tmp_path / "users.acl")))
    secrets_dir = tmp_path / "secrets"
    passwords = [PASSWORDS["bridge"], PASSWORDS["pipeline"], "test-bridge", "test-pipeline"]
    broker = f"localhost:{secure_broker.server.port}"
    redis_at = f"127.0.0.1:{acl_redis.port}/0"
    bridge = BridgeProcess(
        tmp_path, f"mqtts://bridge@{broker}", f"redis://bridge@{redis_at}", "--production",
        "--mqtt-ca-file", str(secure_broker.ca.cert),
        "--mqtt-password-file", str(secret_file(secrets_dir, "bridge-mqtt", passwords[0])),
        "--redis-password-file", str(secret_file(secrets_dir, "bridge-redis", passwords[2])),
    )  # fmt: skip
    api_port = free_port()
    pipeline_log = tmp_path / "pipeline.log"
    pipeline_args = [
        "run", "--production", "--workers", "1", "--http-port", str(api_port),
        "--shards", str(SHARDS), "--mqtt-ca-file", str(secure_broker.ca.cert),
        "--mqtt-url", f"mqtts://pipeline@{broker}", "--redis-url", f"redis://pipeline@{redis_at}",
        "--mqtt-password-file", str(secret_file(secrets_dir, "pipeline-mqtt", passwords[1])),
        "--redis-password-file", str(secret_file(secrets_dir, "pipeline-redis", passwords[3])),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    pipeline = spawn(pipeline_args, env, pipeline_log)
    try:
        bridge.start()  # ready: logged in to the broker and to Redis
        wait_until_blocking(lambda: len(child_pids(pipeline.pid)) == 1, 30, "the worker process")
        with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
            device.subscribe(receipts_topic("kiosk-a"))
            device.subscribe(status_topic("kiosk-a"))
            assert device.publish(orders_topic("kiosk-a"), encode(make_order("kiosk-a", 7))) < 128
            topics = {m.topic for m in device.wait_messages(2, timeout_s=30)}
        assert topics == {receipts_topic("kiosk-a"), status_topic("kiosk-a")}
        assert bridge.process is not None
        [worker] = child_pids(pipeline.pid)
        pids = {"bridge": bridge.process.pid, "pipeline": pipeline.pid, "worker": worker}
        argv = {name: cmdline(pid) for name, pid in pids.items()}
        assert "--mqtt-password-file" in argv["bridge"]
        assert "--redis-password-file" in argv["pipeline"]
        leaked = [(name, p) for name, text in argv.items() for p in passwords if p in text]
        assert leaked == []
    finally:
        bridge.stop()
        stop_all([pipeline])
    logs = bridge.log_path.read_text() + pipeline_log.read_text()
    assert [p for p in passwords if p in logs] == []
    assert "secret_in_argv" not in logs
