"""GEO.md scenarios 5 and 6: an agent power cut between the attempts commit and the PUBLISH,
and a power cut of the authority's Redis right after a cross-region write.

Scenario 5 uses a crash point rather than the FUSE power-cut filesystem: at every
PUBLISH the test copies the outbox files (database and WAL) as they are on disk
at that instant, which is what a power cut there would leave (the agent commits
with ``synchronous=FULL``; a half-written transaction in the copy is ignored by
SQLite's recovery like after a real cut). Each copy must already name every
region of the order's ``attempts`` as published, first name first; and after
the run every region holding an entry must be that first name. The crash point
is what the default run uses: the FUSE mount's cost would buy nothing more for
those instants. ``GEO_SLOW=1`` adds the real thing: an ``edge-agent`` process on
the power-cut disk, cut (and SIGKILLed) at random moments around its failover
while intake keeps writing, eight times, then resent to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.transport import Transport, TransportHandlers, TransportSettings
from fleet.devices import SimDevice
from fleet.geo.stack import GeoStack
from fleet.geo.verify import OutboxRow, read_outbox
from schemas import decode_order
from testrig.powercut import PowerCutMount
from testrig.services import pid_alive
from tests.edge_agent.agent_process import AgentProcess
from tests.helpers import wait_until

from .conftest import (
    GEO_SLOW,
    GeoAgent,
    Observed,
    agent_config,
    all_counts,
    entries,
    geo_agent,
    outbox,
    restore,
    verify_rig,
)


@dataclass(frozen=True)
class Snapshot:
    """The outbox on disk at one PUBLISH, and what that PUBLISH carried."""

    order_id: str
    published: tuple[str, ...]
    files: Path


class CrashPointTransport:
    """The agent's transport; each publish first copies the outbox files as they are on disk."""

    def __init__(self, inner: Transport, db: Path, out: list[Snapshot], root: Path) -> None:
        self._inner = inner
        self._db = db
        self._out = out
        self._root = root

    @property
    def connected(self) -> bool:
        return self._inner.connected

    @property
    def protocol(self) -> str:
        return self._inner.protocol

    async def connect(self) -> bool:
        return await self._inner.connect()

    def publish(self, topic: str, payload: bytes, traceparent: str | None = None) -> int:
        if topic.endswith("/orders"):
            order = decode_order(payload)
            where = self._root / f"cut-{len(self._out):04d}"
            where.mkdir()
            for suffix in ("", "-wal"):
                source = Path(f"{self._db}{suffix}")
                if source.exists():
                    shutil.copyfile(source, where / f"outbox.db{suffix}")
            self._out.append(Snapshot(order.order_id, order.attempts, where / "outbox.db"))
        return self._inner.publish(topic, payload, traceparent)

    async def disconnect(self) -> None:
        await self._inner.disconnect()


class CrashPointDevice(SimDevice):
    """A simulated device whose transports take a crash-point snapshot at each PUBLISH."""

    snapshots: list[Snapshot]
    root: Path
    db: Path

    def _factory(self, settings: TransportSettings, handlers: TransportHandlers) -> Transport:
        inner = super()._factory(settings, handlers)
        return CrashPointTransport(inner, self.db, self.snapshots, self.root)


def read_copy(path: Path) -> dict[str, OutboxRow]:
    """The outbox a restart after the cut would find (SQLite recovers the copied WAL)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return read_outbox(conn)


async def test_power_cut_between_attempts_commit_and_publish(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """At every PUBLISH the disk already holds its attempts; entries live in attempts[0] only."""
    eu = rig.region("eu")
    assert eu.bridge is not None
    assert eu.bridge.pid is not None
    db = tmp_path / "outbox.db"
    tracker = Observed()
    config = agent_config(device_id, rig.agent_regions("eu"), db)
    snapshots: list[Snapshot] = []
    CrashPointDevice.snapshots = snapshots
    CrashPointDevice.root = tmp_path
    CrashPointDevice.db = db
    device = CrashPointDevice(config, tracker)
    async with device.agent:
        agent = GeoAgent(device, tracker, db)
        await wait_until(lambda: agent.connected and agent.region == "eu", what="agent at eu")
        os.kill(eu.bridge.pid, signal.SIGSTOP)
        held = [await agent.submit() for _ in range(5)]  # published to eu, unanswered
        await wait_until(lambda: len(snapshots) >= 5, what="five PUBLISHes to eu")
        pid = eu.broker.pid
        eu.broker.kill()
        assert pid is not None
        assert not pid_alive(pid)
        fresh = [await agent.submit() for _ in range(3)]  # first published at us
        order_ids = held + fresh
        await wait_until(lambda: all(agent.settled(o) for o in order_ids), what="all settled")
        assert agent.region == "us"
        os.kill(eu.bridge.pid, signal.SIGCONT)
        eu.broker.start()
    assert {s.published for s in snapshots} >= {("eu",), ("eu", "us"), ("us",)}, snapshots
    for snap in snapshots:
        on_disk = read_copy(snap.files)[snap.order_id].attempts
        assert on_disk == snap.published, (snap, on_disk)
    rows = {agent.ref(k): v for k, v in outbox(db).items()}
    verdict = await verify_rig(rig, [agent.ref(o) for o in order_ids], rows)
    assert verdict.consistent, verdict
    assert verdict.per_region == {"eu": 5, "us": 3}


@pytest.mark.usefixtures("fuse")
async def test_authority_redis_power_cut_right_after_cross_region_writes(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """us writes eu's orders into eu's Redis; eu's Redis host loses power at once: none lost."""
    eu = rig.region("eu")
    assert eu.bridge is not None
    assert eu.bridge.pid is not None
    async with geo_agent(rig.agent_regions("eu"), tmp_path / "o.db", device_id=device_id) as agent:
        await wait_until(lambda: agent.connected and agent.region == "eu", what="agent at eu")
        os.kill(eu.bridge.pid, signal.SIGSTOP)
        order_ids = [await agent.submit() for _ in range(10)]  # owned by eu, unanswered
        await asyncio.sleep(0.3)
        eu.broker.kill()
        # The agent fails over to us, whose bridge writes them into eu's Redis (cross-region).
        await wait_until(lambda: any(agent.settled(o) for o in order_ids), what="a receipt")
        redis_pid = eu.redis.pid
        report = eu.power_cut()
        receipted = {o for o in order_ids if agent.settled(o)}
        assert redis_pid is not None
        assert not pid_alive(redis_pid)
        assert eu.redis.pid != redis_pid
        counts = all_counts(rig)["eu"]
        assert all(counts[agent.ref(o)] == 1 for o in receipted), (receipted, report)
        os.kill(eu.bridge.pid, signal.SIGCONT)
        eu.broker.start()
        await wait_until(lambda: all(agent.settled(o) for o in order_ids), what="all settled")
    rows = {agent.ref(k): v for k, v in outbox(tmp_path / "o.db").items()}
    verdict = await verify_rig(rig, [agent.ref(o) for o in order_ids], rows)
    assert verdict.consistent, verdict
    assert verdict.per_region == {"eu": 10, "us": 0}
    print(f"power cut after {len(receipted)} cross-region receipts: {report}")


POWER_CUTS = 8
INTAKE_PER_CUT = 100  # orders posted at most while a cut is coming
CUT_SEED = int(os.environ.get("GEO_SEED", "1414"))


def _post_orders(url: str, count: int, stop: threading.Event | None = None) -> list[str]:
    """POST up to ``count`` orders (until ``stop``) to an agent's intake; the ids answered 202."""
    accepted: list[str] = []
    body = {"currency": "EUR", "items": [{"sku": "cola", "qty": 1, "unit_price": 150}],
            "total": 150}  # fmt: skip
    for _ in range(count):
        if stop is not None and stop.is_set():
            break
        request = urllib.request.Request(
            f"{url}/v1/orders", data=json.dumps(body).encode(),
            headers={"content-type": "application/json"}, method="POST",
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 202:
                    accepted.append(json.loads(response.read())["order_id"])
        except OSError:
            break  # the power is off or the agent is gone: not accepted
    return accepted


def _post_into(out: list[str], url: str, count: int, stop: threading.Event) -> None:
    out.extend(_post_orders(url, count, stop))


@pytest.mark.skipif(not GEO_SLOW, reason="set GEO_SLOW=1 to run it (~1 min)")
@pytest.mark.usefixtures("fuse")
def test_agent_power_cuts_around_failover_on_the_power_cut_disk(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """A real edge-agent on the FUSE power-cut disk, cut at random moments around failover."""
    rng = random.Random(CUT_SEED)
    eu = rig.region("eu")
    assert eu.bridge is not None
    accepted: list[str] = []
    dropped = 0

    def agent_on(db: Path) -> AgentProcess:
        for _attempt in range(3):
            agent = AgentProcess(
                tmp_path, device_id=device_id, mqtt_url=eu.mqtt_url, db=db,
                failover_after_s=1.0, failback_probe_s=60, pending_retry_min_s=0.3,
                pending_retry_max_s=1.0,
            )  # fmt: skip
            agent.args += rig.agent_region_flags("eu")
            try:
                agent.start()
            except AssertionError:
                # Free loopback ports get reused by other processes: try another one.
                if "address already in use" not in agent.log_tail(3):
                    raise
                continue
            return agent
        raise AssertionError("no free HTTP port for the agent in three tries")

    with PowerCutMount(tmp_path / "disk") as disk:
        db = disk.path / "outbox.db"
        for cycle in range(POWER_CUTS):
            agent = agent_on(db)
            try:
                bridge_pid = eu.bridge.pid
                assert bridge_pid is not None
                os.kill(bridge_pid, signal.SIGSTOP)  # what goes to eu now stays unanswered
                accepted += _post_orders(agent.url, 5)
                time.sleep(0.3)
                eu.broker.kill()  # the agent fails over to us after 1 s: attempts grow
                # Intake keeps writing while the cut comes, so it can land mid-transaction.
                stop = threading.Event()
                late: list[str] = []
                intake = threading.Thread(
                    target=_post_into, args=(late, agent.url, INTAKE_PER_CUT, stop)
                )
                intake.start()
                time.sleep(rng.uniform(0.3, 2.5))
                dropped += disk.cut().dropped_bytes
                agent.sigkill()
                stop.set()
                intake.join(10)
                accepted += late
            finally:
                agent.stop()
                disk.power_on()
                restore(rig)
            assert len(set(accepted)) == len(accepted), f"cycle {cycle}"
        agent = agent_on(db)
        try:
            deadline = time.monotonic() + 60
            while not all(
                sum(entries(rig, (device_id, o)).values()) == 1 for o in accepted
            ):  # fmt: skip
                assert time.monotonic() < deadline, "202'd orders missing after the cuts"
                time.sleep(0.2)
            time.sleep(1.0)  # a late duplicate would show up now
        finally:
            assert agent.sigterm() == 0
        rows = {(device_id, k): v for k, v in outbox(db).items()}
    verdict = asyncio.run(verify_rig(rig, [(device_id, o) for o in accepted], rows))
    assert verdict.consistent, verdict
    print(f"{POWER_CUTS} power cuts, {dropped} unsynced bytes dropped, {len(accepted)} orders")
