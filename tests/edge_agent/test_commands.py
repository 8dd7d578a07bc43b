"""Device commands: held orders released from the cloud, with no hand on the device.

A broker ACL mistake holds orders (PUBACK 135); once it is fixed, the
operator's ``order-pipeline devices retry-held`` releases them over MQTT, to
one device or to all, and each lands exactly once. A repeated, unknown or
broken command changes nothing and never stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from edge_agent import AgentConfig, EdgeAgent, StorageError
from edge_agent._records import RetryResult
from edge_agent.commands import Commands
from edge_agent.metrics import AgentMetrics
from schemas import RETRY_HELD, Command, encode, names
from testrig.servers import MosquittoProcess
from tests.helpers import wait_until

from ..fleet.mqtt_probe import Probe
from .agent_process import AgentProcess
from .bridge_double import BridgeDouble
from .conftest import order_body

# Anonymous clients share these rules. The mistake: nobody may publish orders.
# Commands may be published in both files; the secure broker's rights (only the
# pipeline's account) are tests/enrolment/test_secure_broker.py's.
ACL_MISTAKE = (
    "topic read v1/devices/#\ntopic read v1/fleet/#\n"
    "topic write v1/devices/+/cmd\ntopic write v1/fleet/cmd\n"
)
ACL_FIXED = "topic readwrite v1/devices/#\ntopic readwrite v1/fleet/#\n"
NOT_AUTHORIZED = 135
ORDERS_PER_DEVICE = 3
OUTCOMES_IGNORED = ("duplicate", "unknown", "invalid")


def acl_broker(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> tuple[MosquittoProcess, Path]:
    """A broker whose ACL file holds the mistake, and that file."""
    acl = tmp_path / "acl"
    acl.write_text(ACL_MISTAKE)
    return mosquitto_factory(extra_conf=f"acl_file {acl}"), acl


async def fix_acl(broker: MosquittoProcess, acl: Path) -> None:
    """Write the fixed ACL, SIGHUP, and wait until the broker applies it."""
    await asyncio.to_thread(acl.write_text, ACL_FIXED)
    await asyncio.to_thread(broker.reload)

    def publish_allowed() -> bool:
        with Probe(broker.port) as probe:
            return probe.publish(names.health_topic("acl-probe"), b"x") < 0x80  # 16: no reader

    await wait_until(lambda: asyncio.to_thread(publish_allowed), 10, "the fixed ACL applied")


async def retry_held_cli(
    broker: MosquittoProcess, *targets: str
) -> tuple[int, list[dict[str, object]]]:
    """Run ``order-pipeline devices retry-held TARGETS`` against the broker."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.cli", "devices", "retry-held", *targets,
        "--mqtt-url", broker.url, "--wait-s", "10",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, [json.loads(line) for line in out.splitlines()]


async def states(http: aiohttp.ClientSession, order_ids: list[str]) -> list[str]:
    """Each order's state on the agent."""
    found = []
    for order_id in order_ids:
        async with http.get(f"/v1/orders/{order_id}") as resp:
            found.append(str((await resp.json())["state"]))
    return found


async def test_held_orders_are_released_remotely_per_device_then_fleet_wide_and_land_once(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    """Two real agents hold 3 orders each; after the ACL fix, `retry-held kiosk-a` releases
    only kiosk-a's, `retry-held --all` then kiosk-b's; every order lands exactly once."""
    broker, acl = acl_broker(tmp_path, mosquitto_factory)
    devices = ("kiosk-a", "kiosk-b")
    agents = {
        device: AgentProcess(
            tmp_path, device_id=device, mqtt_url=broker.url, db=tmp_path / f"{device}.db"
        )
        for device in devices
    }
    orders = {
        device: [f"{device}-held-{i:04d}" for i in range(ORDERS_PER_DEVICE)] for device in devices
    }
    try:
        for agent in agents.values():
            agent.start()
        with BridgeDouble(broker.url) as double:
            sessions = {d: aiohttp.ClientSession(agents[d].url) for d in devices}
            try:
                for device, http in sessions.items():
                    for order_id in orders[device]:
                        async with http.post("/v1/orders", json=order_body(order_id)) as resp:
                            assert resp.status == 202
                for device, http in sessions.items():

                    async def held(http: aiohttp.ClientSession = http, d: str = device) -> bool:
                        return await states(http, orders[d]) == ["held"] * ORDERS_PER_DEVICE

                    await wait_until(held, 20, f"{device}'s orders held after PUBACK 135")
                await fix_acl(broker, acl)
                assert sum(double.seen.values()) == 0  # held: nothing resent by itself

                code, lines = await retry_held_cli(broker, "kiosk-a")
                assert code == 0, lines
                assert [(line["device_id"], line["result"]) for line in lines] == [
                    ("kiosk-a", "delivered")
                ]

                async def a_accepted() -> bool:
                    return (
                        await states(sessions["kiosk-a"], orders["kiosk-a"])
                        == ["accepted"] * ORDERS_PER_DEVICE
                    )

                await wait_until(a_accepted, 20, "kiosk-a's orders accepted after its command")
                # The command named kiosk-a only: kiosk-b's orders are still held.
                assert await states(sessions["kiosk-b"], orders["kiosk-b"]) == ["held"] * 3

                code, lines = await retry_held_cli(broker, "--all")
                assert code == 0, lines
                assert [(line["device_id"], line["result"]) for line in lines] == [
                    ("*", "delivered")
                ]

                async def b_accepted() -> bool:
                    return (
                        await states(sessions["kiosk-b"], orders["kiosk-b"])
                        == ["accepted"] * ORDERS_PER_DEVICE
                    )

                await wait_until(b_accepted, 20, "kiosk-b's orders accepted after --all")
                await asyncio.sleep(0.5)  # room for any stray resend to show up
                every = [oid for device in devices for oid in orders[device]]
                assert {oid: double.seen[oid] for oid in every} == dict.fromkeys(every, 1)
                for device, http in sessions.items():
                    async with http.get("/healthz") as resp:
                        assert (await resp.json())["held"] == 0
                    async with http.get("/metrics") as resp:
                        text = await resp.text()
                    carried_out = 2 if device == "kiosk-a" else 1  # kiosk-a heard --all too
                    assert f'edge_commands_total{{outcome="retry_held"}} {carried_out}.0' in text
            finally:
                for http in sessions.values():
                    await http.close()
        for agent in agents.values():
            assert agent.sigterm() == 0
    finally:
        for agent in agents.values():
            agent.stop()


def rendered(agent: EdgeAgent) -> str:
    """The agent's Prometheus text."""
    return agent.metrics.render().decode()


async def test_a_repeated_unknown_or_broken_command_changes_nothing(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    make_config: Callable[..., AgentConfig],
    device_id: str,
) -> None:
    """A replayed command id releases nothing again, an unknown command and garbage are
    counted and ignored, and a new command is carried out afterwards."""
    broker, _ = acl_broker(tmp_path, mosquitto_factory)
    config = make_config(mqtt_url=broker.url, http_enabled=False)
    topic = names.command_topic(device_id)
    first = encode(Command(v=1, cmd=RETRY_HELD, id="cmd-first-0001", issued_at=1))
    async with EdgeAgent(config) as agent:
        await agent.submit(order_body("cmd-held-0001"))

        async def held() -> bool:
            record = await agent.get("cmd-held-0001")
            return record is not None and record.state == "held"

        await wait_until(held, 20, "held after PUBACK 135")
        with Probe(broker.port) as cloud:
            assert cloud.publish(topic, first) == 0
            # The ACL is still wrong: released, refused again, held again.
            await wait_until(
                lambda: "edge_orders_held_retried_total 1.0" in rendered(agent), 10, "released"
            )
            await wait_until(
                lambda: (
                    f'edge_broker_rejections_total{{code="{NOT_AUTHORIZED}"}} 2.0'
                    in rendered(agent)
                ),
                10,
                "refused again",
            )
            await wait_until(held, 10, "held again")

            assert cloud.publish(topic, first) == 0  # a replay of the same id
            unknown = Command(v=1, cmd="self_destruct", id="cmd-unknown-01", issued_at=2)
            assert cloud.publish(names.FLEET_COMMAND_TOPIC, encode(unknown)) == 0
            assert cloud.publish(topic, b"\xc1 not msgpack") == 0
            counted = [f'edge_commands_total{{outcome="{o}"}} 1.0' for o in OUTCOMES_IGNORED]
            await wait_until(
                lambda: all(line in rendered(agent) for line in counted),
                10,
                "the replay, the unknown command and the garbage counted",
                explain=lambda: rendered(agent),
            )
            assert "edge_orders_held_retried_total 1.0" in rendered(agent)
            assert await held()

            second = Command(v=1, cmd=RETRY_HELD, id="cmd-second-001", issued_at=3)
            assert cloud.publish(topic, encode(second)) == 0
            await wait_until(
                lambda: "edge_orders_held_retried_total 2.0" in rendered(agent),
                10,
                "a new command carried out: the loop is alive",
            )
        assert (await agent.health()).ok


@pytest.mark.parametrize("payload", [b"", b"\x80", b"\x93\x01\x02\x03"])
async def test_a_command_that_does_not_decode_is_only_counted(
    make_config: Callable[..., AgentConfig], device_id: str, payload: bytes
) -> None:
    """Garbage on the command topic never raises out of the MQTT callback."""
    async with EdgeAgent(make_config(http_enabled=False)) as agent:
        agent.commands.on_message(names.command_topic(device_id), payload)
        assert 'edge_commands_total{outcome="invalid"} 1.0' in rendered(agent)


async def test_a_release_the_outbox_refuses_is_tried_again() -> None:
    """The outbox refuses the first release (StorageError): the loop keeps the request,
    backs off, and releases on the next try; one command, two attempts, one success."""
    attempts: list[str] = []
    released = asyncio.Event()

    async def release() -> RetryResult:
        if not attempts:
            attempts.append("refused")
            raise StorageError("disk I/O error", reason="io")
        attempts.append("released")
        released.set()
        return RetryResult(requeued=["o-00000001"], past_horizon=[], not_held=[])

    metrics = AgentMetrics()
    commands = Commands("kiosk-s", metrics, release, retry_s=0.01)
    loop = asyncio.create_task(commands.run())
    try:
        command = Command(v=1, cmd=RETRY_HELD, id="cmd-storage-01", issued_at=1)
        commands.on_message(names.command_topic("kiosk-s"), encode(command))
        async with asyncio.timeout(5):
            await released.wait()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert attempts == ["refused", "released"]
    assert 'edge_commands_total{outcome="retry_held"} 1.0' in metrics.render().decode()
