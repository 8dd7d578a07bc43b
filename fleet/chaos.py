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
| ``spike=Fx:Ds`` | — | the offered rate goes ×F for D seconds (default ``10x:30s``) |
| ``storm`` | own stack | restart the broker once every device is connected: all reconnect |
| ``rolling-upgrade`` | own stack | SIGTERM and restart each bridge, then each worker, in turn |
| ``broker-host-down=I`` | own stack | SIGKILL broker I (``--brokers N``) and leave it down |
| ``broker-host-up=I`` | own stack | start broker I again (empty: no persistence) |
| ``redis-failover`` | replicas | SIGKILL the Redis master, a replica promoted, the old one back |
| ``redis-freeze=S`` | replicas | SIGSTOP the Redis master for S s (a replica promoted), SIGCONT |
| ``enrol-revoke=N`` | own stack | enrol N devices live, drain and revoke half of them |

``redis-failover`` and ``redis-freeze`` need Redis replicas: Sentinel's master
(``--redis-replicas N``), or on a Cluster (``--redis-cluster --redis-replicas 1``)
the master of shard 0's slot, whose replica the Cluster promotes once the master
is silent past ``cluster-node-timeout``. The SIGKILLed master is started again at
once and rejoins as a replica; the frozen one, resumed, is demoted (by the
Sentinels, or by the Cluster's newer configuration epoch).

A broker host loss reports how many devices were connected before, how many
lost their connection, and the seconds until as many were connected again
(to the brokers left: the agents move to their region's next broker after
their ``failover_after_s``).

A spike reports the peak outbox depth and the drain time (from the spike's end
until the outbox depth is back to its level before the spike); a storm reports
how long until every device was back, the restarted broker's CPU (from /proc)
and the spread of the connection attempts (per 100 ms) that the agents'
full-jitter backoff makes. ``enrol-revoke`` (:mod:`fleet.enrol_revoke`) reports
how long the revoked sessions took to end. ``agent-powercut``, ``clock-skew``
and ``enrol-revoke`` act inside the process that runs the devices, so they
need ``--processes 1``.

On the geo rig (``fleet-sim --regions N``) also ``region-down=NAME``,
``region-partition=A|B`` and ``failover-storm``: see :mod:`fleet.geo.chaos`.

Kinds live in one table, :data:`KINDS`; :func:`register_kind` adds one (its
injector gets the runner, the event and the event's index).

Power cuts use :mod:`testrig.powercut` (writes kept in memory until fsync). The
clock skew lasts to the end of the run and only moves the simulated devices'
wall clock (:mod:`fleet.clockskew`); the services keep the true time.

Each fault proves it happened (a killed pid is gone) and is recorded with its time.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import OutOfMemoryError, ResponseError

import servicekit.clock
from testrig.powercut import PowerCutMount
from testrig.procstat import process_cpu_s, process_state
from testrig.proxy import TcpProxy
from testrig.sentinel import role
from testrig.servers import ServerProcess
from testrig.services import pid_alive

from . import enrol_revoke
from .clockskew import WallClockSkew
from .errors import ChaosError
from .geo.chaos import GEO_KINDS, parse_geo_arg
from .rogue import RogueReport, send_rogue
from .rolling import rolling_restart
from .stack import Stack

log = structlog.get_logger(__name__)

SPIKE_POLL_S = 0.25
# A spike has drained when the outbox depth is back to max(2 × its depth before, this).
SPIKE_DRAINED_DEPTH = 20
SPIKE_DRAIN_TIMEOUT_S = 120.0
STORM_CONNECTED_WAIT_S = 60.0
STORM_BACK_TIMEOUT_S = 120.0
STORM_BUCKET_S = 0.1
BROKER_BACK_TIMEOUT_S = 120.0
# A SIGKILLed broker's devices see their connection reset at once; no drop in this
# long means none was connected there.
BROKER_DROP_SEEN_S = 3.0
PROMOTION_TIMEOUT_S = 30.0


class FleetControl(Protocol):
    """What chaos needs of the devices: the in-process :class:`fleet.devices.Fleet`,
    or :class:`fleet.workers.RemoteFleet` for devices spread over worker processes."""

    @property
    def size(self) -> int: ...
    def connected(self) -> int: ...
    def outbox_depth(self) -> int: ...
    def device_ids(self, count: int) -> list[str]: ...
    def set_rate_factor(self, factor: float) -> None: ...
    async def flood(self) -> int: ...
    async def reconnected_since(self, t0: float) -> tuple[int, float | None]: ...
    async def connect_attempts_since(self, t0: float) -> list[float]: ...
    async def restart_disk_devices(self, between: Callable[[], Awaitable[None]]) -> int: ...


@dataclass(frozen=True, order=True)
class ChaosEvent:
    """One fault: ``kind`` (with ``arg``, and ``arg2`` for two-part arguments) at ``at_s``."""

    at_s: float
    kind: str
    arg: float = 0.0
    arg2: float = 0.0
    target: str = ""  # geo kinds: the region name(s)

    @property
    def label(self) -> str:
        """How the event is shown in the report."""
        if self.kind in GEO_KINDS:
            return f"{self.kind}={self.target}/{self.arg:g}s"
        spec = KINDS.get(self.kind)
        if spec is None or spec.default is None:
            return self.kind
        return f"{self.kind}={spec.show(self)}"


Injector = Callable[["ChaosRunner", ChaosEvent, int], Coroutine[Any, Any, str]]
Needs = Literal["stack", "proxy", ""]


def _number(text: str) -> tuple[float, float]:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value, 0.0


def _non_negative(text: str) -> tuple[float, float]:
    value, _ = _number(text)
    if value < 0:
        raise ValueError(text)
    return value, 0.0


_SPIKE = re.compile(r"(\d+(?:\.\d+)?)x:(\d+(?:\.\d+)?)s")


def _spike_arg(text: str) -> tuple[float, float]:
    match = _SPIKE.fullmatch(text)
    if match is None or float(match[1]) <= 0 or float(match[2]) <= 0:
        raise ValueError(text)
    return float(match[1]), float(match[2])


def _index(text: str) -> tuple[float, float]:
    if not re.fullmatch(r"[0-9]{1,3}", text):
        raise ValueError(text)
    return float(text), 0.0


def _show_number(event: ChaosEvent) -> str:
    return f"{event.arg:g}"


@dataclass(frozen=True)
class Kind:
    """A chaos kind: what injects it, what it needs, how its argument reads and shows.

    ``default`` None: the kind takes no argument. ``single_process``: it acts in
    the process that runs the devices, so it needs ``--processes 1``.
    """

    inject: Injector
    needs: Needs = ""
    default: str | None = None
    parse: Callable[[str], tuple[float, float]] = _non_negative
    show: Callable[[ChaosEvent], str] = _show_number
    single_process: bool = False


KINDS: dict[str, Kind] = {}


def register_kind(name: str, kind: Kind) -> None:
    """Add a chaos kind (e.g. the geo stack's); refuses a name already taken."""
    if name in KINDS:
        raise ChaosError(f"chaos kind {name!r} is already registered")
    KINDS[name] = kind


def parse_schedule(text: str) -> list[ChaosEvent]:
    """Parse ``"AT:KIND[=ARG],…"``, sorted by time.

    Raises:
        ChaosError: an unknown kind or a malformed entry.
    """
    events: list[ChaosEvent] = []
    for raw in filter(None, (part.strip() for part in text.split(","))):
        at, sep, rest = raw.partition(":")
        kind, _, arg = rest.partition("=")
        if kind in GEO_KINDS and sep:  # region names, parsed by fleet.geo.chaos
            try:
                at_s, _ = _non_negative(at)
            except ValueError as exc:
                raise ChaosError(f"bad chaos entry {raw!r}: want AT:{kind}=…") from exc
            target, seconds = parse_geo_arg(kind, arg)
            events.append(ChaosEvent(at_s, kind, seconds, target=target))
            continue
        spec = KINDS.get(kind)
        if not sep or spec is None:
            kinds = ", ".join(sorted([*KINDS, *GEO_KINDS]))
            raise ChaosError(f"bad chaos entry {raw!r}: kinds are {kinds}")
        try:
            at_s, _ = _non_negative(at)
            value, value2 = _argument(spec, arg)
        except ValueError as exc:
            want = f"AT:{kind}" + ("" if spec.default is None else f"[={spec.default}]")
            raise ChaosError(f"bad chaos entry {raw!r}: want {want}") from exc
        events.append(ChaosEvent(at_s, kind, value, value2))
    return sorted(events)


def _argument(spec: Kind, text: str) -> tuple[float, float]:
    if spec.default is None:
        if text:
            raise ValueError(text)  # the kind takes no argument
        return 0.0, 0.0
    return spec.parse(text or spec.default)


def needs_proxy(events: list[ChaosEvent]) -> bool:
    """Whether any event is a network fault injected through fleet-sim's TCP proxy."""
    return any(e.kind in KINDS and KINDS[e.kind].needs == "proxy" for e in events)


def check_feasible(
    events: list[ChaosEvent],
    *,
    own_stack: bool,
    proxy: bool,
    processes: int = 1,
    geo: bool = False,
) -> None:
    """Refuse process faults on a stack we did not start, network faults without the proxy,
    and in-process device faults when the devices run in worker processes.

    Raises:
        ChaosError: naming the first fault that cannot be injected.
    """
    for event in events:
        if event.kind in GEO_KINDS:
            if not geo:
                raise ChaosError(f"{event.kind} needs a geo rig: fleet-sim --regions N")
            continue
        spec = KINDS[event.kind]
        if spec.needs == "stack" and not own_stack:
            raise ChaosError(f"{event.kind} needs a stack fleet-sim started itself")
        if spec.needs == "proxy" and not proxy:
            raise ChaosError(f"{event.kind} needs the proxy")
        if spec.single_process and processes > 1:
            raise ChaosError(
                f"{event.kind} needs --processes 1 (it acts inside the devices' process)"
            )


@dataclass
class SpikeReport:
    """What a ``spike`` did to the outboxes: depth before, peak, and the drain time."""

    at_s: float
    factor: float
    duration_s: float
    depth_before: int
    peak_depth: int = 0
    # Seconds from the spike's end until the depth was back (None: not within the timeout).
    drain_s: float | None = None


@dataclass
class StormReport:
    """What a ``storm`` did: who came back how fast, the broker's CPU, the attempts' spread."""

    at_s: float
    devices: int
    connected_before: int
    back: int = 0
    # Seconds from the broker's SIGKILL until the last device was connected again.
    all_back_s: float | None = None
    broker_cpu_s: float = 0.0
    broker_wall_s: float = 0.0
    # Connection attempts per 100 ms from the SIGKILL on.
    attempts_per_bucket: list[int] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        """Connection attempts the devices made after the broker went down."""
        return sum(self.attempts_per_bucket)

    @property
    def max_per_bucket(self) -> int:
        """The most attempts in any 100 ms."""
        return max(self.attempts_per_bucket, default=0)

    @property
    def max_per_s(self) -> int:
        """The most attempts in any one-second window (sliding over 100 ms buckets)."""
        per = round(1 / STORM_BUCKET_S)
        counts = self.attempts_per_bucket
        return max((sum(counts[i : i + per]) for i in range(max(1, len(counts) - per + 1))),
                   default=0)  # fmt: skip

    @property
    def attempts_per_s(self) -> list[int]:
        """Connection attempts in each whole second after the SIGKILL."""
        per = round(1 / STORM_BUCKET_S)
        counts = self.attempts_per_bucket
        return [sum(counts[i : i + per]) for i in range(0, len(counts), per)]

    @property
    def broker_cores(self) -> float:
        """The restarted broker's CPU seconds per wall second until all were back."""
        return self.broker_cpu_s / self.broker_wall_s if self.broker_wall_s > 0 else 0.0


@dataclass
class BrokerRestartReport:
    """What a ``broker-restart`` did to the devices: how many connected again, how fast."""

    at_s: float
    connected_before: int
    back: int = 0  # devices that connected after the SIGKILL
    # Seconds from the SIGKILL until as many devices as before were connected again.
    all_back_s: float | None = None


@dataclass
class BrokerDownReport:
    """What a ``broker-host-down`` did: the kill, and how fast the devices were back."""

    at_s: float
    index: int
    pid: int | None
    gone: bool
    devices: int
    connected_before: int
    dropped: int = 0  # the fewest devices connected after the kill, below connected_before
    # Seconds from the SIGKILL until connected_before devices were connected again.
    all_back_s: float | None = None


@dataclass
class ChaosLog:
    """What the schedule did: events with their times, and the rogue traffic sent."""

    events: list[tuple[float, str]] = field(default_factory=list)
    rogue: list[RogueReport] = field(default_factory=list)
    flooded: int = 0
    spikes: list[SpikeReport] = field(default_factory=list)
    storms: list[StormReport] = field(default_factory=list)
    broker_restarts: list[BrokerRestartReport] = field(default_factory=list)
    broker_downs: list[BrokerDownReport] = field(default_factory=list)
    enrol_revoke: list[enrol_revoke.EnrolRevokeReport] = field(default_factory=list)


class ChaosRunner:
    """Runs a schedule against the stack we started (if any), the proxy and the fleet."""

    def __init__(
        self,
        events: list[ChaosEvent],
        *,
        stack: Stack | None,
        proxy: TcpProxy | None,
        fleet: FleetControl,
        mqtt_url: str,
        prefix: str,
        agent_disk: PowerCutMount | None = None,
        processes: int = 1,
    ) -> None:
        check_feasible(
            events, own_stack=stack is not None, proxy=proxy is not None, processes=processes
        )
        kinds = {e.kind for e in events}
        if "redis-powercut" in kinds and (stack is None or stack.redis_disk is None):
            raise ChaosError("redis-powercut needs a stack with StackSettings(redis_powercut=True)")
        if kinds & {"redis-failover", "redis-freeze"} and (stack is None or not stack.replicated):
            raise ChaosError("redis-failover and redis-freeze need a stack with Redis replicas")
        if "enrol-revoke" in kinds and (stack is None or not stack.settings.dynsec):
            raise ChaosError("enrol-revoke needs a stack with StackSettings(dynsec=True)")
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
        self.started = 0.0
        self._bridge_turn = 0
        self._watchers: asyncio.TaskGroup | None = None

    async def run(self, started: float) -> None:
        """Inject each event at its time (relative to ``started``, monotonic).

        Returns when every event and every measurement they started (a spike's
        drain) is done.
        """
        self.started = started
        async with asyncio.TaskGroup() as watchers:
            self._watchers = watchers
            for n, event in enumerate(self.events):
                await asyncio.sleep(max(0.0, started + event.at_s - time.monotonic()))
                at = time.monotonic() - started
                detail = await KINDS[event.kind].inject(self, event, n)
                self.log.events.append((at, f"{event.label}{detail}"))
                log.info("chaos", at_s=round(at, 1), kind=event.kind, arg=event.arg, detail=detail)
        self._watchers = None

    def watch(self, measurement: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``measurement`` beside the rest of the schedule; :meth:`run` waits for it."""
        if self._watchers is None:
            raise ChaosError("measurements run only inside ChaosRunner.run")
        self._watchers.create_task(measurement, name=name)

    def _own_stack(self) -> Stack:
        if self.stack is None:  # parse-time checks make this unreachable
            raise ChaosError("this fault needs a stack fleet-sim started itself")
        return self.stack

    def _the_proxy(self) -> TcpProxy:
        if self.proxy is None:
            raise ChaosError("this fault needs the proxy")
        return self.proxy

    async def _broker_restart(self, event: ChaosEvent, n: int) -> str:
        before = self.fleet.connected()
        t0 = time.monotonic()
        killed = await asyncio.to_thread(_kill_restart, self._own_stack().broker)
        report = BrokerRestartReport(t0 - self.started, before)
        self.log.broker_restarts.append(report)
        self.watch(self._restart_back(report, t0), name=f"broker-restart-back-{n}")
        return killed

    async def _restart_back(self, report: BrokerRestartReport, t0: float) -> None:
        """Count the devices' CONNACKs since the kill until the connected count is back.

        A sampled connected count misses the cut when every device is back within
        the sampling interval; the CONNACKs do not. (With ``--brokers N`` only the
        first broker's devices are cut.)
        """
        while time.monotonic() - t0 < BROKER_BACK_TIMEOUT_S:
            report.back, last = await self.fleet.reconnected_since(t0)
            if report.back and self.fleet.connected() >= report.connected_before:
                report.all_back_s = (last or t0) - t0
                return
            await asyncio.sleep(SPIKE_POLL_S)

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

    async def _rolling_upgrade(self, event: ChaosEvent, n: int) -> str:
        return await asyncio.to_thread(rolling_restart, self._own_stack())

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

    async def _redis_failover(self, event: ChaosEvent, n: int) -> str:
        stack = self._own_stack()
        old = await asyncio.to_thread(stack.master)
        pid = old.pid
        await asyncio.to_thread(old.kill)
        gone = pid is not None and not pid_alive(pid)
        killed = time.monotonic()
        new = await asyncio.to_thread(_promotion, stack, old.port)
        took = time.monotonic() - killed
        # Stale: Sentinel makes it a replica; a Cluster node rejoins as its heir's replica.
        await asyncio.to_thread(old.start)
        head = f" (master :{old.port} pid {pid} {'gone' if gone else 'ALIVE'}"
        if new is None:
            return f"{head}, NO PROMOTION within {PROMOTION_TIMEOUT_S:g} s)"
        return f"{head}, :{new} promoted in {took:.1f} s (ROLE {role(new)}), old node back)"

    async def _redis_freeze(self, event: ChaosEvent, n: int) -> str:
        stack = self._own_stack()
        old = await asyncio.to_thread(stack.master)
        pid = old.pid
        if pid is None:
            return " (no master running!)"
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            stopped = await _shows_stopped(pid)
            await asyncio.sleep(max(0.0, event.arg - (time.monotonic() - frozen_at)))
            now = await asyncio.to_thread(stack.master_port)
        finally:
            os.kill(pid, signal.SIGCONT)
        promoted = f":{now} promoted" if now not in {None, old.port} else "NO promotion"
        demoter = "the Cluster" if stack.cluster is not None else "Sentinel"
        return (
            f" (master :{old.port} pid {pid} {'stopped' if stopped else 'NOT stopped'} "
            f"{event.arg:g} s, {promoted}; resumed, {demoter} demotes it)"
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
        sent = await self.fleet.flood()
        self.log.flooded += sent
        return f" ({sent} resent)"

    async def _rogue(self, event: ChaosEvent, n: int) -> str:
        victims = self.fleet.device_ids(10)
        first_broker = self.mqtt_url.split(",")[0]
        report = await send_rogue(first_broker, f"{self.prefix}-rogue{n}", int(event.arg), victims)
        self.log.rogue.append(report)
        return f" ({report.sent} sent)"

    async def _spike(self, event: ChaosEvent, n: int) -> str:
        factor, duration_s = event.arg, event.arg2
        report = SpikeReport(time.monotonic() - self.started, factor, duration_s,
                             depth_before=self.fleet.outbox_depth())  # fmt: skip
        report.peak_depth = report.depth_before
        self.log.spikes.append(report)
        end = time.monotonic() + duration_s
        self.fleet.set_rate_factor(factor)
        try:
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(SPIKE_POLL_S, left))
                report.peak_depth = max(report.peak_depth, self.fleet.outbox_depth())
        finally:
            self.fleet.set_rate_factor(1.0)
        self.watch(self._drain(report, end), name=f"spike-drain-{n}")
        return f" (offered rate ×{factor:g} for {duration_s:g} s)"

    async def _drain(self, report: SpikeReport, spike_end: float) -> None:
        """Follow the outbox depth after a spike until it is back to its level before."""
        drained = max(2 * report.depth_before, SPIKE_DRAINED_DEPTH)
        while (since := time.monotonic() - spike_end) < SPIKE_DRAIN_TIMEOUT_S:
            depth = self.fleet.outbox_depth()
            report.peak_depth = max(report.peak_depth, depth)
            if depth <= drained:
                report.drain_s = since
                break
            await asyncio.sleep(SPIKE_POLL_S)
        log.info("spike drained", peak_depth=report.peak_depth, drain_s=report.drain_s)

    async def _storm(self, event: ChaosEvent, n: int) -> str:
        broker = self._own_stack().broker
        size = self.fleet.size
        deadline = time.monotonic() + STORM_CONNECTED_WAIT_S
        # Polled: the devices may live in other processes, with no event to await.
        while self.fleet.connected() < size and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        report = StormReport(time.monotonic() - self.started, size, self.fleet.connected())
        self.log.storms.append(report)
        t0 = time.monotonic()
        killed = await asyncio.to_thread(_kill_restart, broker)
        restarted = time.monotonic()
        deadline = t0 + STORM_BACK_TIMEOUT_S
        last: float | None = None
        while time.monotonic() < deadline:
            report.back, last = await self.fleet.reconnected_since(t0)
            if report.back >= size:
                break
            await asyncio.sleep(SPIKE_POLL_S)
        report.broker_wall_s = time.monotonic() - restarted
        report.broker_cpu_s = process_cpu_s(broker.pid)
        if report.back >= size and last is not None:
            report.all_back_s = last - t0
        report.attempts_per_bucket = _buckets(
            await self.fleet.connect_attempts_since(t0), t0, STORM_BUCKET_S
        )
        back = (
            f"all {size:,} back in {report.all_back_s:.1f} s"
            if report.all_back_s is not None
            else f"only {report.back:,}/{size:,} back after {STORM_BACK_TIMEOUT_S:g} s"
        )
        return (
            f"{killed}; {report.connected_before:,}/{size:,} connected before, {back}; "
            f"broker {report.broker_cpu_s:.1f} CPU s over {report.broker_wall_s:.1f} s "
            f"({report.broker_cores:.2f} cores); {report.attempts:,} connection attempts, "
            f"at most {report.max_per_bucket:,} per 100 ms, {report.max_per_s:,} per s"
        )

    def _broker(self, event: ChaosEvent) -> ServerProcess:
        brokers = self._own_stack().brokers
        index = int(event.arg)
        if index >= len(brokers):
            raise ChaosError(f"{event.kind}={index}: the stack has {len(brokers)} broker(s)")
        return brokers[index]

    async def _broker_host_down(self, event: ChaosEvent, n: int) -> str:
        broker = self._broker(event)
        before = self.fleet.connected()
        pid = broker.pid
        t0 = time.monotonic()
        await asyncio.to_thread(broker.kill)
        report = BrokerDownReport(t0 - self.started, int(event.arg), pid,
                                  pid is not None and not pid_alive(pid), self.fleet.size,
                                  before)  # fmt: skip
        self.log.broker_downs.append(report)
        self.watch(self._back_on_live(report, t0), name=f"broker-back-{n}")
        return f" (pid {pid} {'gone' if report.gone else 'ALIVE'}, stays down)"

    async def _back_on_live(self, report: BrokerDownReport, t0: float) -> None:
        """Follow the connected devices after a broker's loss until as many are back."""
        lowest = report.connected_before
        while time.monotonic() - t0 < BROKER_BACK_TIMEOUT_S:
            connected = self.fleet.connected()
            lowest = min(lowest, connected)
            if lowest < report.connected_before and connected >= report.connected_before:
                report.all_back_s = time.monotonic() - t0
                break
            if lowest == report.connected_before and time.monotonic() - t0 > BROKER_DROP_SEEN_S:
                report.all_back_s = 0.0  # nobody was on that broker
                break
            await asyncio.sleep(0.1)
        report.dropped = report.connected_before - lowest
        log.info("broker host down", index=report.index, dropped=report.dropped,
                 all_back_s=report.all_back_s)  # fmt: skip

    async def _broker_host_up(self, event: ChaosEvent, n: int) -> str:
        broker = self._broker(event)
        if broker.running:
            return " (was running!)"
        await asyncio.to_thread(broker.start)
        return f" (now pid {broker.pid})"


def _buckets(times: list[float], t0: float, width_s: float) -> list[int]:
    """How many of ``times`` (≥ t0) fall in each ``width_s`` bucket from ``t0``."""
    counts: list[int] = []
    for t in times:
        index = int((t - t0) / width_s)
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1
    return counts


def _promotion(stack: Stack, old_port: int) -> int | None:
    """The port of the master promoted in place of ``old_port`` (ROLE agrees), or None if
    none within :data:`PROMOTION_TIMEOUT_S`."""
    deadline = time.monotonic() + PROMOTION_TIMEOUT_S
    while time.monotonic() < deadline:
        if (port := stack.promoted(old_port)) is not None:
            return port
        time.sleep(0.05)
    return None


async def _shows_stopped(pid: int, within_s: float = 1.0) -> bool:
    """True once /proc shows ``pid`` stopped: a SIGSTOP lands after ``kill`` returns, and an
    immediate read showed the master still sleeping ("NOT stopped" in a freeze that worked)."""
    deadline = time.monotonic() + within_s
    while process_state(pid) != "T":
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _kill_restart(server: ServerProcess) -> str:
    pid = server.pid
    server.kill()
    gone = pid is not None and not pid_alive(pid)
    server.start()
    return f" (pid {pid} {'gone' if gone else 'ALIVE'}, now {server.pid})"


for _name, _kind in {
    "broker-restart": Kind(ChaosRunner._broker_restart, needs="stack"),
    "bridge-kill": Kind(ChaosRunner._bridge_kill, needs="stack"),
    "redis-stop": Kind(ChaosRunner._redis_stop, needs="stack", default="5"),
    "worker-kill": Kind(ChaosRunner._worker_kill, needs="stack"),
    "redis-powercut": Kind(ChaosRunner._redis_powercut, needs="stack"),
    "redis-oom": Kind(ChaosRunner._redis_oom, needs="stack", default="3"),
    "storm": Kind(ChaosRunner._storm, needs="stack"),
    "rolling-upgrade": Kind(ChaosRunner._rolling_upgrade, needs="stack"),
    "broker-host-down": Kind(ChaosRunner._broker_host_down, needs="stack", default="0",
                             parse=_index),
    "broker-host-up": Kind(ChaosRunner._broker_host_up, needs="stack", default="0",
                           parse=_index),
    "redis-failover": Kind(ChaosRunner._redis_failover, needs="stack"),
    "redis-freeze": Kind(ChaosRunner._redis_freeze, needs="stack", default="5"),
    "enrol-revoke": Kind(enrol_revoke.inject, needs="stack", default="4", single_process=True,
                         show=lambda e: f"{e.arg:g}"),
    "drop": Kind(ChaosRunner._drop, needs="proxy", default="0.3"),
    "refuse": Kind(ChaosRunner._refuse, needs="proxy", default="5"),
    "dup-flood": Kind(ChaosRunner._dup_flood),
    "rogue": Kind(ChaosRunner._rogue, default="50"),
    "agent-powercut": Kind(ChaosRunner._agent_powercut, single_process=True),
    "clock-skew": Kind(ChaosRunner._clock_skew, default=str(3 * 86_400), parse=_number,
                       single_process=True),
    "spike": Kind(ChaosRunner._spike, default="10x:30s", parse=_spike_arg,
                  show=lambda e: f"{e.arg:g}x:{e.arg2:g}s"),
}.items():  # fmt: skip
    register_kind(_name, _kind)
