"""Chaos between regions, for runs on the geo rig (:mod:`fleet.geo.stack`).

``region-down=NAME[/S]``
    SIGKILL the region's broker, Redis and bridge; start them again after S s
    (default 10).
``region-partition=A|B[/S]``
    Blackhole the bridge → remote-Redis links between A and B, both ways, for
    S s. Nothing is reset: commands in flight hang, as in a real partition.
``failover-storm[=NAME][/S]``
    SIGKILL region NAME's broker (default: the first region) with all its
    devices connected: they all fail over at once. The broker is back after S s.

These kinds take region names, so they parse here (:func:`parse_geo_arg`) and
:mod:`fleet.chaos` only registers them. Every fault proves it happened: the
killed pids are gone, the links report themselves blackholed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import structlog

from testrig.services import pid_alive

from ..errors import ChaosError, FleetError

if TYPE_CHECKING:
    from ..chaos import ChaosEvent, ChaosLog
    from .stack import GeoStack

log = structlog.get_logger(__name__)

GEO_KINDS: Final = frozenset({"region-down", "region-partition", "failover-storm"})
GEO_DEFAULT_S: Final = {"region-down": 10.0, "region-partition": 10.0, "failover-storm": 10.0}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-|")


def parse_geo_arg(kind: str, text: str) -> tuple[str, float]:
    """``"eu/8"`` → ``("eu", 8.0)``; the target is checked against the rig when the run starts.

    Raises:
        ChaosError: a malformed argument.
    """
    target, sep, seconds = text.partition("/")
    try:
        value = float(seconds) if sep else GEO_DEFAULT_S[kind]
    except ValueError as exc:
        raise ChaosError(f"bad {kind} duration {seconds!r}: want NAME/SECONDS") from exc
    if value <= 0 or not set(target) <= _NAME_CHARS:
        raise ChaosError(f"bad {kind} argument {text!r}")
    if kind == "region-down" and (not target or "|" in target):
        raise ChaosError(f"{kind} wants one region name, not {text!r}")
    if kind == "region-partition" and len([n for n in target.split("|") if n]) != 2:
        raise ChaosError(f"{kind} wants two region names, A|B, not {text!r}")
    if kind == "failover-storm" and "|" in target:
        raise ChaosError(f"{kind} wants at most one region name, not {text!r}")
    return target, value


class GeoChaosRunner:
    """Runs the geo kinds of a schedule against the rig; writes into the shared ChaosLog."""

    def __init__(
        self,
        events: list[ChaosEvent],
        geo: GeoStack,
        chaos_log: ChaosLog,
        connected: Callable[[], int] | None = None,
    ) -> None:
        self.events = [e for e in events if e.kind in GEO_KINDS]
        self.geo = geo
        self.log = chaos_log
        self.connected = connected
        for event in self.events:  # refuse unknown regions before the run, not at 40 s in
            try:
                self._targets(event)
            except FleetError as exc:
                raise ChaosError(f"{event.label}: {exc}") from exc

    def _targets(self, event: ChaosEvent) -> list[str]:
        if event.kind == "region-partition":
            a, b = event.target.split("|")
            self.geo.pair_links(a, b)
            return [a, b]
        name = event.target or self.geo.names[0]
        self.geo.region(name)
        return [name]

    async def run(self, started: float) -> None:
        """Inject each event at its time; the outages end on their own, concurrently."""
        async with asyncio.TaskGroup() as tg:
            for event in self.events:
                await asyncio.sleep(max(0.0, started + event.at_s - time.monotonic()))
                tg.create_task(self._one(event, started), name=f"chaos-{event.kind}")

    async def _one(self, event: ChaosEvent, started: float) -> None:
        at = time.monotonic() - started
        targets = self._targets(event)
        match event.kind:
            case "region-down":
                detail = await self._region_down(targets[0], event.arg)
            case "region-partition":
                detail = await self._partition(targets[0], targets[1], event.arg)
            case _:
                detail = await self._failover_storm(targets[0], event.arg)
        self.log.events.append((at, f"{event.label}{detail}"))
        log.info("chaos", at_s=round(at, 1), kind=event.kind, target=event.target, detail=detail)

    async def _region_down(self, name: str, seconds: float) -> str:
        region = self.geo.region(name)
        killed = await asyncio.to_thread(region.down)
        alive = [pid for pid in killed if pid_alive(pid)]
        await asyncio.sleep(seconds)
        await asyncio.to_thread(region.up)
        await asyncio.to_thread(region.wait_ready)
        state = "all gone" if not alive else f"ALIVE: {alive}"
        return f" (killed {len(killed)} processes, {state}; back after {seconds:g} s)"

    async def _partition(self, a: str, b: str, seconds: float) -> str:
        await asyncio.to_thread(self.geo.partition, a, b)
        held = sorted(self.geo.partitioned())
        await asyncio.sleep(seconds)
        opened = sum(self.geo.links.links[n].stats.accepted for n in self.geo.pair_links(a, b))
        await asyncio.to_thread(self.geo.heal, a, b)
        return f" (blackholed {', '.join(held)} for {seconds:g} s; {opened} connections so far)"

    async def _failover_storm(self, name: str, seconds: float) -> str:
        region = self.geo.region(name)
        before = self.connected() if self.connected else -1
        pid = region.broker.pid
        await asyncio.to_thread(region.broker.kill)
        gone = pid is not None and not pid_alive(pid)
        # How long until as many devices are connected as before (they failed over).
        back_s: float | None = None
        low = before
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.1)
            if self.connected is not None:
                now = self.connected()
                low = min(low, now)
                if back_s is None and low < before and now >= before:
                    back_s = time.monotonic() - t0
        await asyncio.to_thread(region.broker.start)
        shown = "not within the outage" if back_s is None else f"{back_s:.1f} s"
        return (
            f" (broker pid {pid} {'gone' if gone else 'ALIVE'}; connected {before} → {low}, "
            f"all back: {shown}; broker back after {seconds:g} s)"
        )
