"""Geo mode's connection policy (GEO.md): when to switch region, and probing home.

The agent talks to one broker at a time; :class:`RegionSelector` decides when
to move to the region's next broker or the next region (no answer for
``failover_after_s``) and back. On a switch the publisher takes a fresh
transport. While away from home, a throw-away CONNECT to home's brokers every
``failback_probe_s`` tells when it is back. Single-region mode with several
brokers uses the switches and never probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
        previous, previous_url = geo.current, geo.current_url
        if geo.should_fail_back():
            kind, region = "failback", geo.fail_back()
        elif geo.should_fail_over():
            region = geo.fail_over()
            kind = "broker" if region is previous else "failover"
        else:
            return None
        self._metrics.region_switches.labels(kind).inc()
        log.warning(
            "region_switched" if kind != "broker" else "broker_switched",
            kind=kind,
            from_region=previous.name,
            to_region=region.name,
            from_url=str(previous_url),
            url=str(geo.current_url),
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

    async def probe_home(self) -> int | None:
        """Throw-away CONNECTs to home's brokers in order; the first that gets a CONNACK."""
        for index, url in enumerate(self.regions.home.urls):
            settings = dataclasses.replace(self._probe_settings, url=url)
            probe = self._probe_factory(settings, _DEAF)
            try:
                await probe.connect()
            except BrokerError as exc:
                log.info("home_probe_failed", region=self.regions.home.name, url=str(url),
                         error=exc.detail)  # fmt: skip
                continue
            finally:
                await probe.disconnect()
            return index
        return None

    async def run_failback_probe(self, wake: asyncio.Event) -> None:
        """Probe home every ``failback_probe_s`` while away; set ``wake`` when it answers."""
        geo = self.regions
        while True:
            await asyncio.sleep(max(self._config.failback_probe_s, geo.failback_wait_s()))
            if geo.at_home or geo.should_fail_back() or geo.failback_wait_s() > 0:
                continue
            try:
                broker = await self.probe_home()
            except Exception:
                # Isolation boundary: a failed probe must not stop the agent; try next time.
                log.exception("home_probe_error")
                self._metrics.loop_errors.labels("failback_probe").inc()
                continue
            if broker is not None and not geo.at_home:
                log.info("home_probe_ok", region=geo.home.name, current=geo.current.name,
                         url=str(geo.home.urls[broker]))  # fmt: skip
                geo.on_home_probe_ok(broker)
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
