"""The publisher: sends unreceipted orders oldest first and settles them by receipt.

An order leaves the "to send" set only when the bridge's receipt arrives on
``v1/devices/{id}/receipts``, never on PUBACK: a broker restarted without
persistence forgets what it PUBACKed. Orders without a receipt after
``receipt_timeout_s``, and all of them after a reconnect, are sent again;
the bridge's dedup makes the repeats harmless.

Flow control: at most ``max_inflight`` orders await receipts, and a token
bucket caps the drain rate, so a device back from a week offline neither
floods the cloud nor takes days to catch up.

What comes back (PUBACKs, receipts, statuses) is handled in ``_answers.py``.
Every time here is the agent clock (``_clock.py``), so a wall-clock jump
neither stalls a retry nor lets an order out past its dedup horizon.

Brokers (``regions.py``, ``_geo_link.py``): one broker at a time, the next of
the region after ``failover_after_s`` without an answer. Geo mode (GEO.md):
before the first PUBLISH of an order to a region not yet in its ``attempts``,
the name is committed to the outbox, and the order goes out re-encoded with
them. Without regions, the committed bytes go out unchanged.
"""

from __future__ import annotations

import asyncio
import random

import structlog

from schemas import SchemaError, StatusQuery, encode, names
from servicekit import tracing
from servicekit.backoff import Backoff
from servicekit.rate_limit import TokenBucket
from servicekit.urls import MqttUrl, parse_mqtt_urls

from ._answers import Answers
from ._geo_link import RegionLink
from ._window import Window
from .commands import Commands
from .config import AgentConfig
from .errors import BrokerError, StorageError
from .metrics import AgentMetrics
from .outbox import Outbox
from .regions import Region, RegionSelector, spread, with_attempt, with_attempts
from .transport import Transport, TransportFactory, TransportSettings, default_transport

log = structlog.get_logger(__name__)


class Publisher:
    """Owns the MQTT connection of one agent; run :meth:`run` as a task."""

    def __init__(
        self,
        config: AgentConfig,
        outbox: Outbox,
        metrics: AgentMetrics,
        *,
        transport_factory: TransportFactory = default_transport,
        probe_factory: TransportFactory = default_transport,
        rng: random.Random | None = None,
        commands: Commands | None = None,
    ) -> None:
        self._config = config
        self._commands = commands
        self._outbox = outbox
        self._metrics = metrics
        rng = rng or random.Random()
        self._orders_topic = names.orders_topic(config.device_id)
        self._receipts_topic = names.receipts_topic(config.device_id)
        self._status_topic = names.status_topic(config.device_id)
        self._status_query_topic = names.status_query_topic(config.device_id)
        self._clock = outbox.clock
        self._transport_factory = transport_factory
        # One broker at a time (regions.py): geo mode's regions, or single-region
        # mode's brokers as one unnamed region; a fresh transport per switch.
        regions = config.regions
        brokers = regions or (Region("", parse_mqtt_urls(config.mqtt_url)),)
        if config.broker_order == "hashed":
            brokers = spread(brokers, config.device_id)
        self._selector = RegionSelector(
            brokers,
            failover_after_s=config.failover_after_s,
            monotonic=self._clock.monotonic_s,
            failback_holdoff_s=config.failback_probe_s,
        )
        self.regions = self._selector if regions else None  # geo mode only
        self.url = self._selector.current_url
        # Home probes get a plain transport: nothing that wraps or observes the
        # agent's session (health's Will, the simulator's tracker) ever sees one.
        self._link = RegionLink(
            config,
            metrics,
            self._selector,
            probe_factory=probe_factory,
            probe_settings=self._settings(self._selector.home.url, probe=True),
        )
        self._transport: Transport = transport_factory(self._settings(self.url), self)
        # At most one second's worth at once, so a backlog never leaves in a burst.
        rate_per_s = config.drain_rate_per_min / 60.0
        self._bucket = TokenBucket(rate_per_s, burst=min(config.max_inflight, rate_per_s))
        self._window = Window(tracing.pending_spans("order publish"))  # publish → receipt
        self._wake = asyncio.Event()
        self._answers = Answers(
            config, outbox, metrics, self._window, regions=self._selector, wake=self.wake, rng=rng
        )
        self._reconnect = Backoff(config.reconnect_min_s, config.reconnect_max_s, rng)
        self.last_error: str | None = None

    def _settings(self, url: MqttUrl, *, probe: bool = False) -> TransportSettings:
        config = self._config
        return TransportSettings(
            url=url,
            # A probe must never resume (and drain) the agent's own session.
            client_id=f"{config.mqtt_client_id}-probe" if probe else config.mqtt_client_id,
            subscriptions=() if probe else self._subscriptions(),
            keepalive_s=config.keepalive_s,
            session_expiry_s=0 if probe else config.session_expiry_s,
            connect_timeout_s=config.connect_timeout_s,
            max_inflight=config.max_inflight,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )

    def _subscriptions(self) -> tuple[str, ...]:
        commands = () if self._commands is None else self._commands.topics
        return (self._receipts_topic, self._status_topic, *commands)

    @property
    def _region_name(self) -> str | None:
        return None if self.regions is None else self.regions.current.name

    @property
    def region(self) -> str | None:
        """The region in use (geo mode), else None."""
        return self._region_name

    @property
    def connected(self) -> bool:
        return self._transport.connected

    @property
    def protocol(self) -> str:
        return self._transport.protocol

    @property
    def inflight(self) -> int:
        return len(self._window.receipts)

    @property
    def last_rejection(self) -> str | None:
        """The broker's last refusal of a publish (PUBACK code and reason), if any."""
        return self._answers.last_rejection

    def wake(self) -> None:
        """Something changed (new order, receipt): look for work now."""
        self._wake.set()

    async def run(self) -> None:
        """Connect, pump, reconnect with capped full-jitter backoff; forever, for any outage.

        In geo mode the region may change between connections (``regions.py``).
        """
        while True:
            previous = self._transport
            if self._switch_region_if_due():
                await previous.disconnect()  # not connected; drops its client
            try:
                session_present = await self._transport.connect()
            except BrokerError as exc:
                self.last_error = exc.detail
                self._metrics.connect_failures.inc()
                # Wake in time to fail over, or back home after a good probe.
                delay = min(self._reconnect.next_delay(), self._selector.seconds_until_failover())
                log.warning(
                    "mqtt_connect_failed",
                    error=exc.detail,
                    region=self._region_name,
                    retry_in_s=round(delay, 3),
                )
                await self._sleep_unless_failback(delay)
                continue
            self._reconnect.reset()
            self.last_error = None
            self._metrics.connects.inc()
            connected_to = self._selector.position
            self._selector.on_connected()
            log.info(
                "mqtt_connected",
                url=str(self.url),
                region=self._region_name,
                protocol=self._transport.protocol,
                session_present=session_present,
            )
            try:
                await self._pump()
            except StorageError as exc:
                # The outbox cannot be read: health shows it; retry on a fresh connection.
                log.error("publisher_storage_error", reason=exc.reason, detail=exc.detail)  # noqa: TRY400
                await self._transport.disconnect()
            except Exception:
                # Isolation boundary: a bug here must not stop the agent taking orders.
                log.exception("publisher_failed")
                await self._transport.disconnect()
            switched = self._selector.position != connected_to
            self._selector.on_disconnected()
            if switched:
                continue  # the pump left for another broker: connect there at once
            await self._reconnect.wait()

    def _switch_region_if_due(self) -> bool:
        """Fail back or over (broker or region) if due; return whether the broker changed."""
        if self._link.switch_if_due(len(self._window.receipts)) is None:
            return False
        self.url = self._selector.current_url
        # A fresh transport per switch: the factory's latest transport is always the
        # one in use (wrappers such as health's reporter rely on that).
        self._transport = self._transport_factory(self._settings(self.url), self)
        self._reconnect.reset()
        return True

    async def _sleep_unless_failback(self, delay: float) -> None:
        """Sleep ``delay``; a good probe of home (``wake``) cuts it short in geo mode."""
        if self.regions is None:
            await asyncio.sleep(delay)
        else:
            await self._link.sleep_unless_failback(delay, self._wake)

    async def run_failback_probe(self) -> None:
        """While away from home, probe it every ``failback_probe_s``; go home when it answers."""
        if self.regions is not None:
            await self._link.run_failback_probe(self._wake)

    async def close(self) -> None:
        """Disconnect cleanly; unreceipted orders stay in the outbox."""
        await self._transport.disconnect()

    async def _pump(self) -> None:
        cfg = self._config
        window = self._window
        window.reset()
        # Every unreceipted order goes out again on a new connection.
        await self._outbox.flush()
        await self._outbox.make_all_due()
        selector = self._selector
        while self._transport.connected:
            leaving = self._transport
            if self._switch_region_if_due():
                await leaving.disconnect()
                return
            self._wake.clear()
            now = self._clock.monotonic_s()
            for order_id, deadline in list(window.receipts.items()):
                if deadline <= now:
                    del window.receipts[order_id]
                    self._metrics.receipt_timeouts.inc()
                    window.spans.end(order_id, "receipt_timeout", failed=True)
            timeout = cfg.poll_interval_s
            free = cfg.max_inflight - len(window.receipts)
            if free > 0:
                tokens = self._bucket.take_up_to(free)
                sent = await self._send_due(tokens) if tokens else 0
                self._bucket.give_back(tokens - sent)
                if sent and sent == tokens:
                    continue  # there may be more due right away
                if not tokens:
                    timeout = min(timeout, self._bucket.seconds_until(1))
            if window.receipts:
                timeout = min(timeout, max(0.0, min(window.receipts.values()) - now))
            timeout = min(timeout, selector.seconds_until_failover())
            try:
                async with asyncio.timeout(max(timeout, 0.001)):
                    await self._wake.wait()
            except TimeoutError:
                pass
        log.warning("mqtt_connection_lost", inflight=len(window.receipts))
        window.spans.end_all("connection_lost")

    def horizon_ms(self) -> int:
        """Agent-clock ms: orders first sent at or before it must never be sent again."""
        return self._clock.now_ms() - int(self._config.resend_max_age_s * 1000)

    async def _send_due(self, limit: int) -> int:
        window = self._window
        due = await self._outbox.due(
            self._clock.now_ms(), limit, set(window.receipts), self.horizon_ms()
        )
        timeout_s = self._config.receipt_timeout_s
        region = self._region_name
        if region is not None:
            # GEO.md: the region is in the order's attempts, on disk, before the first
            # PUBLISH to it; a crash after this commit and before the PUBLISH only
            # leaves a name of a region that never saw the order.
            new = [order.order_id for order in due if region not in order.regions.split(",")]
            if new:
                await self._outbox.add_region(new, region)
        sent = 0
        for order in due:
            if not self._transport.connected:
                break
            payload = order.payload
            if region is not None:
                try:
                    payload = with_attempts(order.payload, with_attempt(order.regions, region))
                except SchemaError as exc:
                    log.error("order_held_too_large", order_id=order.order_id, error=str(exc))  # noqa: TRY400
                    self._outbox.hold(order.order_id, exc.reason)
                    continue
            traceparent = window.spans.begin(order.order_id, order.traceparent)
            try:
                mid = self._transport.publish(self._orders_topic, payload, traceparent)
            except BrokerError as exc:
                log.warning("publish_failed", order_id=order.order_id, error=exc.detail)
                window.spans.end(order.order_id, "publish_failed", failed=True)
                break
            self._selector.on_sent()
            window.receipts[order.order_id] = self._clock.monotonic_s() + timeout_s
            window.orders[mid] = (order.order_id, order.sends)
            clock_now = self._clock.now_ms()
            self._outbox.mark_sent(order.order_id, clock_now + int(timeout_s * 1000), clock_now)
            sent += 1
        self._metrics.published.inc(sent)
        return sent

    def publish_status_query(self, order_ids: tuple[str, ...]) -> bool:
        """Ask the pipeline for these orders' statuses again; False when not connected."""
        if not self._transport.connected:
            return False
        payload = encode(StatusQuery(v=1, order_ids=order_ids))
        try:
            mid = self._transport.publish(self._status_query_topic, payload)
        except BrokerError as exc:
            log.warning("status_query_publish_failed", error=exc.detail)
            return False
        self._window.queries.add(mid)
        self._metrics.status_queries.inc()
        return True

    # --- TransportHandlers: called on the event loop by the transport ---------

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        self._answers.on_puback(mid, reason_code, reason)

    def on_message(self, topic: str, payload: bytes) -> None:
        if self._commands is not None and topic in self._commands.topics:
            self._commands.on_message(topic, payload)
        else:
            self._answers.on_message(topic, payload)

    def on_connection_lost(self, reason: str) -> None:
        self.last_error = f"connection lost: {reason}"
        self._wake.set()
