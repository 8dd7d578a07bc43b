"""Simulated devices: N real edge agents in one process, with in-memory outboxes.

Each device is an :class:`edge_agent.EdgeAgent` (outbox, publisher, its own
MQTT connection and client id) with ``db=":memory:"`` and inline storage, so
a thousand of them share one event loop and a handful of threads. The last
``light_devices`` of a fleet are lightweight devices instead
(:mod:`fleet.light`): the same wire behaviour at a fraction of the CPU.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from edge_agent import AgentConfig, AgentError, EdgeAgent
from edge_agent.transport import Transport, TransportHandlers, TransportSettings, default_transport

from .light import LightDevice, LightPool, LightSettings
from .tracker import ObservingHandlers, ObservingTransport, Tracker

log = structlog.get_logger(__name__)

CLOSE_CHUNK = 200
# The field default backs off to an hour between queries for one order. In a run,
# queries sent while the pipeline lags (a spike's backlog) go unanswered and push
# the next one minutes out; statuses lost later (a storm while the backlog drains)
# would then be asked for only after the run. Capped so the verifier sees them.
STATUS_QUERY_MAX_INTERVAL_S = 10.0


@dataclass(frozen=True)
class FleetSettings:
    """How the simulated devices connect and behave."""

    devices: int
    mqtt_url: str
    prefix: str = "sim"
    ramp_per_s: float = 500.0
    receipt_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 5.0
    # The first ``disk_devices`` devices keep their outbox in a file under
    # ``disk`` (the agent-powercut chaos kind mounts a power-cut filesystem there).
    disk: Path | None = None
    disk_devices: int = 0
    # Device numbers start here (a worker process of a multi-process run gets a slice).
    first_index: int = 0
    # How often an idle agent looks at its outbox; longer for big fleets, whose idle
    # polls of thousands of in-memory outboxes otherwise cost a core.
    poll_interval_s: float = 0.5
    # How long after its receipt an order without a terminal status is asked about:
    # seconds, not the field default's minute, so a run's verifier sees recovery.
    status_query_delay_s: float = 3.0
    # With several brokers (a comma-separated mqtt_url): seconds without one before
    # an agent moves to the next; each device has its own order (broker_order hashed).
    failover_after_s: float = 3.0
    # How many of the devices (the last ones) are lightweight devices (fleet.light).
    light_devices: int = 0


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("cannot raise open-file limit", soft=soft, hard=hard)
    return soft


class Catalog:
    """The SKUs and prices orders are drawn from (the pipeline's catalog file)."""

    def __init__(self, prices: dict[str, int], currency: str) -> None:
        self.prices = prices
        self.currency = currency
        self._skus = sorted(prices)

    @classmethod
    def load(cls, path: Path) -> Catalog:
        """Read a TOML catalog (``currency``, ``[items.SKU] price``)."""
        data = tomllib.loads(path.read_text())
        prices = {sku: int(item["price"]) for sku, item in data["items"].items()}
        return cls(prices, str(data.get("currency", "EUR")))

    def order_body(self, rng: random.Random) -> dict[str, Any]:
        """An intake order: 1–3 distinct SKUs, 1–3 of each."""
        # random() and int(): randint and sample cost several times more, and a light
        # device's whole order costs little more than drawing one this way.
        skus = self._skus
        n = len(skus)
        chosen: list[str] = []
        for _ in range(1 + int(rng.random() * min(3, n))):
            sku = skus[int(rng.random() * n)]
            while sku in chosen:
                sku = skus[int(rng.random() * n)]
            chosen.append(sku)
        lines = [(s, 1 + int(rng.random() * 3), self.prices[s]) for s in chosen]
        items = [{"sku": s, "qty": q, "unit_price": p} for s, q, p in lines]
        total = sum(q * p for _, q, p in lines)
        return {"currency": self.currency, "items": items, "total": total}


class SimDevice:
    """One simulated device: a real agent whose transport we observe."""

    def __init__(self, config: AgentConfig, tracker: Tracker) -> None:
        self.device_id = config.device_id
        self.tracker = tracker
        self.transport: ObservingTransport | None = None
        self.agent = EdgeAgent(
            config, transport_factory=self._factory, inline_storage=config.db == ":memory:"
        )

    def _factory(self, settings: TransportSettings, handlers: TransportHandlers) -> Transport:
        observing = ObservingHandlers(self.device_id, handlers, self.tracker)
        inner = default_transport(settings, observing)
        self.transport = ObservingTransport(self.device_id, inner, self.tracker)
        return self.transport

    async def submit(self, body: dict[str, Any]) -> None:
        """Place an order; a ``queued`` answer is recorded as accepted."""
        started = time.monotonic()
        try:
            result = await self.agent.submit(body)
        except AgentError:
            self.tracker.refused += 1
            return
        self.tracker.queued((self.device_id, result.order_id), started)


class Fleet:
    """The simulated devices; ``async with`` connects them with a ramp and closes them all."""

    def __init__(self, settings: FleetSettings, tracker: Tracker) -> None:
        self.settings = settings
        self.tracker = tracker
        # Every device, real agents first; orders are offered over all of them.
        self.devices: list[SimDevice | LightDevice] = []
        self.agents: list[SimDevice] = []
        self.pool: LightPool | None = None
        self._started: list[SimDevice] = []
        # The offered rate's multiplier (the ``spike`` chaos kind raises it for a while).
        self.rate_factor = 1.0

    def _device_id(self, index: int) -> str:
        return f"{self.settings.prefix}-{index:05d}"

    def _config(self, index: int) -> AgentConfig:
        s = self.settings
        device_id = self._device_id(index)
        on_disk = s.disk is not None and index - s.first_index < s.disk_devices
        # Status recovery, where the agent has it: ask for a missing terminal status
        # soon enough for the run's verifier to see it.
        recovery: dict[str, Any] = (
            {
                "status_query_delay_s": s.status_query_delay_s,
                "status_query_max_interval_s": max(
                    s.status_query_delay_s, STATUS_QUERY_MAX_INTERVAL_S
                ),
            }
            if "status_query_delay_s" in AgentConfig.__struct_fields__
            else {}
        )
        brokers: dict[str, Any] = (
            {"failover_after_s": s.failover_after_s, "broker_order": "hashed"}
            if "," in s.mqtt_url
            else {}
        )
        return AgentConfig(
            **recovery,
            **brokers,
            device_id=device_id,
            mqtt_url=s.mqtt_url,
            db=str(s.disk / f"{device_id}.db") if s.disk is not None and on_disk else ":memory:",
            http_enabled=False,
            receipt_timeout_s=s.receipt_timeout_s,
            reconnect_min_s=s.reconnect_min_s,
            reconnect_max_s=s.reconnect_max_s,
            poll_interval_s=s.poll_interval_s,
        )

    async def __aenter__(self) -> Fleet:
        raise_open_file_limit()
        s = self.settings
        step = max(1, int(s.ramp_per_s / 10))
        light = max(0, min(s.light_devices, s.devices))
        first, real_end = s.first_index, s.first_index + s.devices - light
        try:
            for index in range(first, real_end):
                device = SimDevice(self._config(index), self.tracker)
                await device.agent.__aenter__()
                self.devices.append(device)
                self.agents.append(device)
                self._started.append(device)
                if (index - first + 1) % step == 0:
                    await asyncio.sleep(0.1)
            if light:
                ids = [self._device_id(i) for i in range(real_end, real_end + light)]
                self.pool = LightPool(self._light_settings(), self.tracker, ids)
                self.devices.extend(self.pool.devices)
                await self.pool.start(s.ramp_per_s)
        except BaseException:
            await self.close()
            raise
        return self

    def _light_settings(self) -> LightSettings:
        s = self.settings
        return LightSettings(
            mqtt_url=s.mqtt_url,
            receipt_timeout_s=s.receipt_timeout_s,
            reconnect_min_s=s.reconnect_min_s,
            reconnect_max_s=s.reconnect_max_s,
            status_query_delay_s=s.status_query_delay_s,
            status_query_max_interval_s=max(s.status_query_delay_s, STATUS_QUERY_MAX_INTERVAL_S),
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every agent, a chunk at a time (each disconnects cleanly), and the light ones."""
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()
        started, self._started = self._started, []
        for i in range(0, len(started), CLOSE_CHUNK):
            chunk = started[i : i + CLOSE_CHUNK]
            await asyncio.gather(
                *(d.agent.__aexit__(None, None, None) for d in chunk), return_exceptions=True
            )

    async def restart_disk_devices(self, between: Callable[[], Awaitable[None]]) -> int:
        """Stop the devices with file outboxes, run ``between``, start them again on their files.

        Returns how many were restarted. Their tracker history carries on: a new
        agent object reopens the same outbox and the same MQTT session.
        """
        count = min(self.settings.disk_devices, len(self.agents))
        first = self.settings.first_index
        old = self.agents[:count]
        # Whatever the stopped agents still try to write fails while the power is off.
        await asyncio.gather(
            *(d.agent.__aexit__(None, None, None) for d in old), return_exceptions=True
        )
        self._started = [d for d in self._started if d not in old]
        await between()
        for index in range(count):
            device = SimDevice(self._config(first + index), self.tracker)
            await device.agent.__aenter__()
            self.devices[index] = self.agents[index] = device
            self._started.append(device)
        return count

    async def add_device(self, device_id: str, mqtt_url: str, client_id: str) -> SimDevice:
        """Start one more device (one enrolled live) and offer it orders from now on."""
        template = self._config(self.settings.first_index)
        config = msgspec.structs.replace(
            template, device_id=device_id, mqtt_url=mqtt_url, client_id=client_id, db=":memory:"
        )
        device = SimDevice(config, self.tracker)
        await device.agent.__aenter__()
        self.devices.append(device)
        self.agents.append(device)
        self._started.append(device)
        return device

    def retire(self, device: SimDevice) -> None:
        """Offer ``device`` no more orders; its agent runs on (its outbox still drains)."""
        self.devices.remove(device)

    async def stop_device(self, device: SimDevice) -> None:
        """Stop a retired device's agent (a revoked device, say)."""
        self._started.remove(device)
        self.agents.remove(device)
        await device.agent.__aexit__(None, None, None)

    def connected(self) -> int:
        """Devices with a live broker connection right now."""
        light = self.pool.connected() if self.pool is not None else 0
        return light + sum(1 for d in self.agents if d.agent.publisher.connected)

    def outbox_depth(self) -> int:
        """Orders in all outboxes not yet receipted."""
        light = self.pool.outbox_depth() if self.pool is not None else 0
        return light + sum(d.agent.outbox.store.pending_rows for d in self.agents)

    async def wait_connected(self, fraction: float, timeout_s: float) -> int:
        """Wait until ``fraction`` of the devices are connected or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        want = int(len(self.devices) * fraction)
        # Polled: connection state lives in each agent's publisher, with no event to await.
        while (n := self.connected()) < want and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return n

    @property
    def size(self) -> int:
        """How many devices the fleet has."""
        return len(self.devices)

    def device_ids(self, count: int) -> list[str]:
        """The first ``count`` device ids."""
        return [d.device_id for d in self.devices[:count]]

    def set_rate_factor(self, factor: float) -> None:
        """Multiply the offered rate by ``factor`` from now on."""
        self.rate_factor = factor

    async def reconnected_since(self, t0: float) -> tuple[int, float | None]:
        """Devices connected at or after monotonic ``t0``, and when the last did."""
        return self.tracker.reconnected_since(t0)

    async def connect_attempts_since(self, t0: float) -> list[float]:
        """Monotonic times of the connection attempts at or after ``t0``."""
        return [t for t in self.tracker.connect_attempts if t >= t0]

    async def flood(self) -> int:
        """Every connected device resends every receipted order's payload raw; return the count."""
        by_id = {d.device_id: d for d in self.agents}
        sent = self.pool.flood() if self.pool is not None else 0
        for ref in list(self.tracker.receipted):
            device = by_id.get(ref[0])
            payload = self.tracker.payloads.get(ref)
            if device is None or payload is None or device.transport is None:
                continue
            if device.transport.connected:
                device.transport.resend(*payload)
                sent += 1
        return sent
