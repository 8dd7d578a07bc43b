"""Geo mode's connection policy (GEO.md): when to switch region, and probing home.

The agent talks to one region's broker at a time; :class:`RegionSelector`
decides when to fail over (no answer for ``failover_after_s``) and back. On a
switch the publisher takes a fresh transport. While away from home, a
throw-away CONNECT to home every ``failback_probe_s`` tells when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import structlog

from .config import AgentConfig
from .errors import BrokerError
from .metrics import AgentMetrics
from .regions import Region, RegionSelector
from .transport import TransportFactory, TransportSettings

log = structlog.get_logger(__name__)


class RegionLink:
    """Region switches and home probes for one agent's publisher in geo mode.

    The probe comes from ``probe_factory`` (default: plain paho) with
    ``probe_settings``: client id ``{client_id}-probe``, no subscriptions and
    session expiry 0, so it can never resume (and drain) the agent's session.
    """

    def __init__(
        self,
        config: AgentConfig,
        metrics: AgentMetrics,
        regions: RegionSelector,
        *,
        probe_factory: TransportFactory,
        probe_settings: TransportSettings,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self.regions = regions
        self._probe_factory = probe_factory
        self._probe_settings = probe_settings

    def switch_if_due(self, inflight: int) -> Region | None:
        """Fail back or over if due; the region to connect to now, else None."""
        geo = self.regions
        previous = geo.current
        if geo.should_fail_back():
            kind, region = "failback", geo.fail_back()
        elif geo.should_fail_over():
            kind, region = "failover", geo.fail_over()
        else:
            return None
        self._metrics.region_switches.labels(kind).inc()
        log.warning(
            "region_switched",
            kind=kind,
            from_region=previous.name,
            to_region=region.name,
            url=str(region.url),
            inflight=inflight,
        )
        return region

    async def sleep_unless_failback(self, delay: float, wake: asyncio.Event) -> None:
        """Sleep ``delay``; a good probe of home (``wake`` set) cuts it short."""
        wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(delay, 0.0)):
                while not self.regions.should_fail_back():
                    await wake.wait()
                    wake.clear()

    async def probe_home(self) -> bool:
        """One throw-away CONNECT to the home region's broker; True on a CONNACK."""
        probe = self._probe_factory(self._probe_settings, _DEAF)
        try:
            await probe.connect()
        except BrokerError as exc:
            log.info("home_probe_failed", region=self.regions.home.name, error=exc.detail)
            return False
        finally:
            await probe.disconnect()
        return True

    async def run_failback_probe(self, wake: asyncio.Event) -> None:
        """Probe home every ``failback_probe_s`` while away; set ``wake`` when it answers."""
        geo = self.regions
        while True:
            await asyncio.sleep(max(self._config.failback_probe_s, geo.failback_wait_s()))
            if geo.at_home or geo.should_fail_back() or geo.failback_wait_s() > 0:
                continue
            try:
                healthy = await self.probe_home()
            except Exception:
                # Isolation boundary: a failed probe must not stop the agent; try next time.
                log.exception("home_probe_error")
                self._metrics.loop_errors.labels("failback_probe").inc()
                continue
            if healthy and not geo.at_home:
                log.info("home_probe_ok", region=geo.home.name, current=geo.current.name)
                geo.on_home_probe_ok()
                wake.set()


class _Deaf:
    """Handlers of a probe connection: it publishes nothing and subscribes to nothing."""

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        pass

    def on_message(self, topic: str, payload: bytes) -> None:
        pass

    def on_connection_lost(self, reason: str) -> None:
        pass


_DEAF: Final = _Deaf()
