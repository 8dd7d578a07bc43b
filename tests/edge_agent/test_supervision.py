"""No silent death: loops outlast any outage; a loop that ends takes the process down loudly."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.errors import BackgroundLoopDied
from edge_agent.transport import TransportHandlers, TransportSettings
from testrig.servers import MosquittoProcess, free_port, port_is_open
from tests.helpers import wait_until

from .agent_process import AgentProcess
from .bridge_double import BridgeDouble
from .conftest import order_body

FAILURES = 10_000


def _port_outside_ephemeral_range() -> int:
    """A free port no client socket can get as its source port.

    10,000 connects to a closed ephemeral-range port on loopback will, now
    and then, draw that very port as their source and connect to themselves
    (TCP simultaneous open), which then keeps the broker from binding it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_ten_thousand_connect_failures_then_recovery_within_two_seconds(
    tmp_path: Path, device_id: str, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    """The same process survives 10,000 refused connects, then delivers every order once, fast."""
    port = _port_outside_ephemeral_range()
    assert not port_is_open(port)  # the fault: nothing listens there
    agent = AgentProcess(
        tmp_path,
        device_id=device_id,
        mqtt_url=f"mqtt://127.0.0.1:{port}",
        db=tmp_path / "o.db",
        reconnect_min_s="0.0001",
        reconnect_max_s="0.0005",
        receipt_timeout_s="30",  # the receipts' round trip is not what is timed here
        log_level="error",  # 10,000 connect warnings would be most of the run's cost
    )
    agent.start()
    pid = agent.process.pid if agent.process else None
    ids = [f"outage-{i:04d}" for i in range(50)]
    try:
        async with aiohttp.ClientSession(agent.url) as http:
            for order_id in ids:
                async with http.post("/v1/orders", json=order_body(order_id)) as resp:
                    assert resp.status == 202

            async def enough_failures() -> bool:
                failed = await asyncio.to_thread(
                    _metric, agent.url, "edge_mqtt_connect_failures_total"
                )
                return failed >= FAILURES

            outage_at = time.monotonic()
            await wait_until(enough_failures, 240, f"{FAILURES} connect failures")
            outage_s = time.monotonic() - outage_at
            assert agent.process is not None
            assert agent.process.poll() is None
            assert agent.process.pid == pid
            broker = mosquitto_factory(port=port)  # start() returns once the port accepts
            back_at = time.monotonic()
            with BridgeDouble(broker.url) as double:
                bridge_at = time.monotonic()  # orders sent before this went to no subscriber

                async def connected() -> bool:
                    async with http.get("/healthz") as resp:
                        return bool((await resp.json())["broker_connected"])

                await wait_until(connected, 10, "reconnected")
                reconnect_s = time.monotonic() - back_at
                missing = await asyncio.to_thread(double.wait_for, set(ids), 30)
                assert not missing

                async def drained() -> bool:
                    async with http.get("/healthz") as resp:
                        return bool((await resp.json())["outbox_depth"] == 0)

                await wait_until(drained, 30, "every order receipted")
                delivered_s = time.monotonic() - bridge_at
                # QoS 1 may deliver a message twice when the agent's first connections
                # race (a retried CONNECT, a resend with DUP); the bridge's dedup makes
                # that exactly once in the streams (tests/bridge/test_faults.py).
                assert all(double.seen[i] >= 1 for i in ids)
        print(
            f"\n{FAILURES} connect failures in {outage_s:.1f} s; "
            f"reconnected {reconnect_s:.3f} s after the broker returned; every order "
            f"receipted {delivered_s:.3f} s after the bridge double subscribed"
        )
        assert reconnect_s < 2.0
        # Orders sent before the bridge subscribed were answered PUBACK 0x10 (no subscribers)
        # and go out again after a backoff of at most 1 s per such refusal.
        assert delivered_s < 3.0
        assert agent.process.pid == pid
        assert agent.sigterm() == 0
    finally:
        agent.stop()


class _BrokenTransport:
    """A Transport double whose connect has a bug (not a broker error)."""

    def __init__(self, _settings: TransportSettings, _handlers: TransportHandlers) -> None:
        pass

    connected = False
    protocol = "5"

    async def connect(self) -> bool:
        raise ZeroDivisionError("a bug in connect")

    def publish(self, topic: str, payload: bytes, traceparent: str | None = None) -> int:
        raise AssertionError("never connected")

    async def disconnect(self) -> None:
        return None


async def test_a_loop_that_dies_stops_the_agent_naming_it(
    make_config: Callable[..., AgentConfig],
) -> None:
    """A loop ending with an unexpected error ends the agent with BackgroundLoopDied(loop)."""
    with pytest.raises(BackgroundLoopDied) as info:
        async with EdgeAgent(make_config(http_enabled=False), transport_factory=_BrokenTransport):
            await asyncio.sleep(30)
    assert info.value.loop == "publisher"
    assert "ZeroDivisionError" in info.value.detail


async def test_dead_loop_exits_the_process_non_zero(tmp_path: Path, device_id: str) -> None:
    """The `edge-agent` command exits 70 with a log line naming the loop that died."""
    script = (
        "import sys, edge_agent.status_recovery as sr\n"
        "async def broken(self):\n"
        "    raise RuntimeError('injected bug')\n"
        "sr.StatusRecovery.run = broken\n"
        "from edge_agent.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "--device-id", device_id,
        "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}", "--db", str(tmp_path / "o.db"),
        "--http-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 70, text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    died = [e for e in events if e["msg"] == "background_loop_died"]
    assert [e["loop"] for e in died] == ["status_recovery"], text
    assert died[0]["level"] == "critical"
    assert "RuntimeError: injected bug" in died[0]["exception"]
    assert events[-1]["msg"] == "agent_exiting"
