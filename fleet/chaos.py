"""The chaos schedule: faults injected at given seconds into a run.

``--chaos "20:broker-restart,30:bridge-kill,40:redis-stop=5,45:worker-kill,
50:drop=0.3,55:dup-flood,58:rogue=50"``

| kind | needs | what |
|---|---|---|
| ``broker-restart`` | own stack | SIGKILL Mosquitto (no persistence), start it again |
| ``bridge-kill`` | own stack | SIGKILL a bridge replica (round robin), start it again |
| ``redis-stop=S`` | own stack | stop Redis for S seconds (appendonly: nothing lost) |
| ``worker-kill`` | own stack | SIGKILL a pipeline worker process; the supervisor replaces it |
| ``drop=F`` | proxy | abort a fraction F of the device connections |
| ``refuse=S`` | proxy | refuse new device connections for S seconds |
| ``dup-flood`` | — | every device resends every receipted order, raw |
| ``rogue=N`` | — | N malformed or spoofed payloads from a rogue device |
| ``redis-powercut`` | own stack | Redis host power cut: unsynced writes dropped, SIGKILL, restart |
| ``redis-oom=S`` | own stack | ``maxmemory`` below use for S s (writes answer OOM), then back |
| ``agent-powercut`` | — | power cut of the devices with file outboxes; they restart on it |
| ``clock-skew=S`` | — | the devices' wall clock jumps by S seconds (negative: back) |

On the geo rig (``fleet-sim --regions N``) also ``region-down=NAME``,
``region-partition=A|B`` and ``failover-storm``: see :mod:`fleet.geo_chaos`.

Power cuts use :mod:`fleet.powercut` (writes kept in memory until fsync). The
clock skew lasts to the end of the run and only moves the simulated devices'
wall clock (:mod:`fleet.clockskew`); the services keep the true time.

Each fault proves it happened (a killed pid is gone) and is recorded with its time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from redis.exceptions import OutOfMemoryError, ResponseError

import servicekit.clock

from .clockskew import WallClockSkew
from .devices import Fleet
from .errors import ChaosError
from .geo_chaos import GEO_KINDS, parse_geo_arg
from .powercut import PowerCutMount
from .proxy import TcpProxy
from .rogue import RogueReport, send_rogue
from .servers import ServerProcess
from .services import pid_alive
from .stack import Stack

log = structlog.get_logger(__name__)

STACK_KINDS = frozenset(
    {"broker-restart", "bridge-kill", "redis-stop", "worker-kill", "redis-powercut", "redis-oom"}
)
PROXY_KINDS = frozenset({"drop", "refuse"})
OTHER_KINDS = frozenset({"dup-flood", "rogue", "agent-powercut", "clock-skew"})
KINDS = STACK_KINDS | PROXY_KINDS | OTHER_KINDS | GEO_KINDS
DEFAULT_ARG = {
    "redis-stop": 5.0, "drop": 0.3, "refuse": 5.0, "rogue": 50.0, "redis-oom": 3.0,
    "clock-skew": 3 * 86_400.0,
}  # fmt: skip


@dataclass(frozen=True, order=True)
class ChaosEvent:
    """One fault: ``kind`` (with ``arg``) at ``at_s`` seconds into the load."""

    at_s: float
    kind: str
    arg: float = 0.0
    target: str = ""  # geo kinds: the region name(s)

    @property
    def label(self) -> str:
        """How the event is shown in the report."""
        if self.kind in GEO_KINDS:
            return f"{self.kind}={self.target}/{self.arg:g}s"
        return f"{self.kind}={self.arg:g}" if self.kind in DEFAULT_ARG else self.kind


def parse_schedule(text: str) -> list[ChaosEvent]:
    """Parse ``"AT:KIND[=ARG],…"``, sorted by time.

    Raises:
        ChaosError: an unknown kind or a malformed entry.
    """
    events: list[ChaosEvent] = []
    for raw in filter(None, (part.strip() for part in text.split(","))):
        at, sep, rest = raw.partition(":")
        kind, _, arg = rest.partition("=")
        if kind in GEO_KINDS and sep:
            try:
                at_s = float(at)
            except ValueError as exc:
                raise ChaosError(f"bad chaos entry {raw!r}: want AT:KIND[=ARG]") from exc
            if at_s < 0:
                raise ChaosError(f"bad chaos entry {raw!r}: negative time")
            target, seconds = parse_geo_arg(kind, arg)
            events.append(ChaosEvent(at_s, kind, seconds, target))
            continue
        try:
            at_s = float(at)
            value = float(arg) if arg else DEFAULT_ARG.get(kind, 0.0)
        except ValueError as exc:
            raise ChaosError(f"bad chaos entry {raw!r}: want AT:KIND[=ARG]") from exc
        if not sep or kind not in KINDS or at_s < 0 or (value < 0 and kind != "clock-skew"):
            raise ChaosError(f"bad chaos entry {raw!r}: kinds are {', '.join(sorted(KINDS))}")
        events.append(ChaosEvent(at_s, kind, value))
    return sorted(events)


def check_feasible(
    events: list[ChaosEvent], *, own_stack: bool, proxy: bool, geo: bool = False
) -> None:
    """Refuse process faults on a stack we did not start, and network faults without the proxy.

    Raises:
        ChaosError: naming the first fault that cannot be injected.
    """
    for event in events:
        if event.kind in STACK_KINDS and not own_stack:
            raise ChaosError(f"{event.kind} needs a stack fleet-sim started itself")
        if event.kind in PROXY_KINDS and not proxy:
            raise ChaosError(f"{event.kind} needs the proxy")
        if event.kind in GEO_KINDS and not geo:
            raise ChaosError(f"{event.kind} needs a geo rig: fleet-sim --regions N")


@dataclass
class ChaosLog:
    """What the schedule did: events with their times, and the rogue traffic sent."""

    events: list[tuple[float, str]] = field(default_factory=list)
    rogue: list[RogueReport] = field(default_factory=list)
    flooded: int = 0


class ChaosRunner:
    """Runs a schedule against the stack we started (if any), the proxy and the fleet."""

    def __init__(
        self,
        events: list[ChaosEvent],
        *,
        stack: Stack | None,
        proxy: TcpProxy | None,
        fleet: Fleet,
        mqtt_url: str,
        prefix: str,
        agent_disk: PowerCutMount | None = None,
    ) -> None:
        check_feasible(events, own_stack=stack is not None, proxy=proxy is not None)
        kinds = {e.kind for e in events}
        if "redis-powercut" in kinds and (stack is None or stack.redis_disk is None):
            raise ChaosError("redis-powercut needs a stack with StackSettings(redis_powercut=True)")
        if "agent-powercut" in kinds and agent_disk is None:
            raise ChaosError("agent-powercut needs devices with outboxes on a power-cut disk")
        self.agent_disk = agent_disk
        self.clock = WallClockSkew()
        self.events = events
        self.stack = stack
        self.proxy = proxy
        self.fleet = fleet
        self.mqtt_url = mqtt_url
        self.prefix = prefix
        self.log = ChaosLog()
        self._bridge_turn = 0

    async def run(self, started: float) -> None:
        """Inject each event at its time (relative to ``started``, monotonic)."""
        for n, event in enumerate(self.events):
            await asyncio.sleep(max(0.0, started + event.at_s - time.monotonic()))
            at = time.monotonic() - started
            detail = await self._inject(event, n)
            self.log.events.append((at, f"{event.label}{detail}"))
            log.info("chaos", at_s=round(at, 1), kind=event.kind, arg=event.arg, detail=detail)

    async def _inject(self, event: ChaosEvent, n: int) -> str:
        inject = getattr(self, "_" + event.kind.replace("-", "_"))
        detail: str = await inject(event, n)
        return detail

    def _own_stack(self) -> Stack:
        if self.stack is None:  # parse-time checks make this unreachable
            raise ChaosError("this fault needs a stack fleet-sim started itself")
        return self.stack

    def _the_proxy(self) -> TcpProxy:
        if self.proxy is None:
            raise ChaosError("this fault needs the proxy")
        return self.proxy

    async def _broker_restart(self, event: ChaosEvent, n: int) -> str:
        return await asyncio.to_thread(_kill_restart, self._own_stack().broker)

    async def _bridge_kill(self, event: ChaosEvent, n: int) -> str:
        bridges = self._own_stack().bridges
        bridge = bridges[self._bridge_turn % len(bridges)]
        self._bridge_turn += 1
        return await asyncio.to_thread(_kill_restart, bridge)

    async def _redis_stop(self, event: ChaosEvent, n: int) -> str:
        redis = self._own_stack().redis
        await asyncio.to_thread(redis.stop)
        down = not redis.running
        await asyncio.sleep(event.arg)
        await asyncio.to_thread(redis.start)
        return " (was down)" if down else " (did not stop!)"

    async def _worker_kill(self, event: ChaosEvent, n: int) -> str:
        pid = await asyncio.to_thread(self._own_stack().kill_worker)
        if pid is None:
            return " (no worker found!)"
        await asyncio.sleep(0.2)
        return f" (pid {pid} {'ALIVE' if pid_alive(pid) else 'gone'})"

    async def _redis_powercut(self, event: ChaosEvent, n: int) -> str:
        stack = self._own_stack()
        disk = stack.redis_disk
        if disk is None:  # refused in __init__
            raise ChaosError("redis-powercut needs the stack's Redis on a power-cut disk")
        pid = stack.redis.pid
        report = await asyncio.to_thread(disk.cut)
        await asyncio.to_thread(stack.redis.kill)
        gone = pid is not None and not pid_alive(pid)
        await asyncio.to_thread(disk.power_on)
        await asyncio.to_thread(stack.redis.start)
        return (
            f" (pid {pid} {'gone' if gone else 'ALIVE'}, {report.dropped_bytes} unsynced bytes"
            f" dropped, now {stack.redis.pid})"
        )

    async def _redis_oom(self, event: ChaosEvent, n: int) -> str:
        client = aioredis.from_url(self._own_stack().redis.url)
        try:
            before = str((await client.config_get("maxmemory"))["maxmemory"])
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory", max(1, used // 2))
            try:
                try:
                    await client.set("chaos:oom-probe", "x")
                    refused = "writes NOT refused!"
                except OutOfMemoryError:
                    refused = "writes refused: OOM"
                except ResponseError as exc:
                    refused = f"write failed: {exc}"
                await asyncio.sleep(event.arg)
            finally:
                await client.config_set("maxmemory", before)
        finally:
            await client.aclose()
        return f" ({refused} for {event.arg:g} s, maxmemory back to {before})"

    async def _agent_powercut(self, event: ChaosEvent, n: int) -> str:
        disk = self.agent_disk
        if disk is None:  # refused in __init__
            raise ChaosError("agent-powercut needs devices with outboxes on a power-cut disk")
        report = await asyncio.to_thread(disk.cut)

        async def power_on() -> None:
            await asyncio.to_thread(disk.power_on)

        count = await self.fleet.restart_disk_devices(power_on)
        return f" ({count} agents restarted, {report.dropped_bytes} unsynced bytes dropped)"

    async def _clock_skew(self, event: ChaosEvent, n: int) -> str:
        true_ms = time.time_ns() // 1_000_000
        self.clock.jump(event.arg)
        shown_s = (servicekit.clock.now_ms() - true_ms) / 1000
        return f" (device wall clock {shown_s:+,.0f} s off)"

    def restore(self) -> None:
        """Undo what outlives the run: the devices' wall clock."""
        self.clock.restore()

    async def _drop(self, event: ChaosEvent, n: int) -> str:
        return f" ({self._the_proxy().drop(event.arg)} connections)"

    async def _refuse(self, event: ChaosEvent, n: int) -> str:
        async with self._the_proxy().refusing():
            await asyncio.sleep(event.arg)
        return f" ({self._the_proxy().stats.refused} refused so far)"

    async def _dup_flood(self, event: ChaosEvent, n: int) -> str:
        sent = self.fleet.flood()
        self.log.flooded += sent
        return f" ({sent} resent)"

    async def _rogue(self, event: ChaosEvent, n: int) -> str:
        victims = [d.device_id for d in self.fleet.devices[:10]]
        report = await send_rogue(self.mqtt_url, f"{self.prefix}-rogue{n}", int(event.arg), victims)
        self.log.rogue.append(report)
        return f" ({report.sent} sent)"


def _kill_restart(server: ServerProcess) -> str:
    pid = server.pid
    server.kill()
    gone = pid is not None and not pid_alive(pid)
    server.start()
    return f" (pid {pid} {'gone' if gone else 'ALIVE'}, now {server.pid})"
