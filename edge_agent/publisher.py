"""The publisher: sends unreceipted orders oldest first and settles them by receipt.

An order leaves the "to send" set only when the bridge's receipt arrives on
``v1/devices/{id}/receipts``, never on PUBACK: a broker restarted without
persistence forgets what it PUBACKed. Orders without a receipt after
``receipt_timeout_s``, and all of them after a reconnect, are sent again;
the bridge's dedup makes the repeats harmless.

Flow control: at most ``max_inflight`` orders await receipts, and a token
bucket caps the drain rate, so a device back from a week offline neither
floods the cloud nor takes days to catch up.

A PUBACK error code is classified in ``_puback.py``: transient codes defer
the order by a capped backoff, definitive ones hold it. Every time here is
the agent clock (``_clock.py``), so a wall-clock jump neither stalls a retry
nor lets an order out past its dedup horizon.

Geo mode (``regions.py``, GEO.md): one region's broker at a time; before the
first PUBLISH of an order to a region not yet in its ``attempts``, the name is
committed to the outbox, and the order goes out re-encoded with them. A
``pending`` receipt keeps the order and resends it after a per-order backoff.
Without regions, the committed bytes go out unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import msgspec
import structlog

from schemas import (
    DecodeError,
    Reason,
    SchemaError,
    StatusQuery,
    decode_order,
    decode_receipt,
    decode_status,
    encode,
    names,
)
from servicekit import tracing
from servicekit.backoff import Backoff, full_jitter
from servicekit.logs import truncate
from servicekit.rate_limit import TokenBucket
from servicekit.urls import MqttUrl

from ._puback import NO_MATCHING_SUBSCRIBERS, PubackAction, classify
from ._records import TERMINAL_STATUSES
from .config import AgentConfig
from .errors import BrokerError, StorageError
from .metrics import AgentMetrics
from .outbox import Outbox
from .regions import RegionSelector, with_attempt
from .transport import Transport, TransportFactory, TransportSettings, default_transport

log = structlog.get_logger(__name__)

# Per-order `pending` counts kept for backoff; beyond this many, forget them all.
MAX_PENDING_STREAKS = 100_000


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
    ) -> None:
        self._config = config
        self._outbox = outbox
        self._metrics = metrics
        self._rng = rng or random.Random()
        self.url = MqttUrl.parse(config.mqtt_url)
        self._orders_topic = names.orders_topic(config.device_id)
        self._receipts_topic = names.receipts_topic(config.device_id)
        self._status_topic = names.status_topic(config.device_id)
        self._status_query_topic = names.status_query_topic(config.device_id)
        self._clock = outbox.clock
        self._transport_factory = transport_factory
        # Home probes get a plain transport: nothing that wraps or observes the
        # agent's session (health's Will, the simulator's tracker) ever sees one.
        self._probe_factory = probe_factory
        # Geo mode (regions.py): one region at a time, a fresh transport per switch.
        regions = config.regions
        self.regions = (
            RegionSelector(
                regions,
                failover_after_s=config.failover_after_s,
                monotonic=self._clock.monotonic_s,
                failback_holdoff_s=config.failback_probe_s,
            )
            if regions
            else None
        )
        if self.regions is not None:
            self.url = self.regions.home.url
        self._transport: Transport = transport_factory(self._settings(self.url), self)
        # At most one second's worth at once, so a backlog never leaves in a burst.
        rate_per_s = config.drain_rate_per_min / 60.0
        self._bucket = TokenBucket(rate_per_s, burst=min(config.max_inflight, rate_per_s))
        self._inflight: dict[str, float] = {}  # order_id -> receipt deadline (monotonic)
        self._mids: dict[int, tuple[str, int]] = {}  # mid -> (order_id, earlier sends)
        self._query_mids: set[int] = set()
        self._pending_streak: dict[str, int] = {}  # order_id -> `pending` receipts in a row
        self._wake = asyncio.Event()
        self._reconnect = Backoff(config.reconnect_min_s, config.reconnect_max_s, self._rng)
        self.last_error: str | None = None
        self.last_rejection: str | None = None
        self._spans = tracing.pending_spans("order publish")  # publish → receipt

    def _settings(self, url: MqttUrl, *, probe: bool = False) -> TransportSettings:
        config = self._config
        return TransportSettings(
            url=url,
            # A probe must never resume (and drain) the agent's own session.
            client_id=f"{config.mqtt_client_id}-probe" if probe else config.mqtt_client_id,
            subscriptions=() if probe else (self._receipts_topic, self._status_topic),
            keepalive_s=config.keepalive_s,
            session_expiry_s=0 if probe else config.session_expiry_s,
            connect_timeout_s=config.connect_timeout_s,
            max_inflight=config.max_inflight,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )

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
        return len(self._inflight)

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
                delay = self._reconnect.next_delay()
                if self.regions is not None:
                    # Wake in time to fail over, or back home after a good probe.
                    delay = min(delay, self.regions.seconds_until_failover())
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
            connected_to = self._region_name
            if self.regions is not None:
                self.regions.on_connected()
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
            if self.regions is not None:
                switched = self.regions.current.name != connected_to
                self.regions.on_disconnected()
                if switched:
                    continue  # the pump left for another region: connect there at once
            await self._reconnect.wait()

    def _switch_region_if_due(self) -> bool:
        """Geo: fail back or over if due; return whether the region changed."""
        geo = self.regions
        if geo is None:
            return False
        previous = geo.current
        if geo.should_fail_back():
            kind, region = "failback", geo.fail_back()
        elif geo.should_fail_over():
            kind, region = "failover", geo.fail_over()
        else:
            return False
        self._metrics.region_switches.labels(kind).inc()
        log.warning(
            "region_switched",
            kind=kind,
            from_region=previous.name,
            to_region=region.name,
            url=str(region.url),
            inflight=len(self._inflight),
        )
        self.url = region.url
        # A fresh transport per switch: the factory's latest transport is always the
        # one in use (wrappers such as health's reporter rely on that).
        self._transport = self._transport_factory(self._settings(region.url), self)
        self._reconnect.reset()
        return True

    async def _sleep_unless_failback(self, delay: float) -> None:
        """Sleep ``delay``; a good probe of home (``wake``) cuts it short in geo mode."""
        if self.regions is None:
            await asyncio.sleep(delay)
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(delay, 0.0)):
                while not self.regions.should_fail_back():
                    await self._wake.wait()
                    self._wake.clear()

    async def probe_home(self) -> bool:
        """One throw-away CONNECT to the home region's broker; True on a CONNACK.

        The probe comes from ``probe_factory`` (default: plain paho), with
        client id ``{client_id}-probe``, no subscriptions and session expiry 0.
        """
        if self.regions is None:
            return True
        probe = self._probe_factory(self._settings(self.regions.home.url, probe=True), _Deaf())
        try:
            await probe.connect()
        except BrokerError as exc:
            log.info("home_probe_failed", region=self.regions.home.name, error=exc.detail)
            return False
        finally:
            await probe.disconnect()
        return True

    async def run_failback_probe(self) -> None:
        """While away from home, probe it every ``failback_probe_s``; go home when it answers."""
        geo = self.regions
        if geo is None:
            return
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
                self._wake.set()

    async def close(self) -> None:
        """Disconnect cleanly; unreceipted orders stay in the outbox."""
        await self._transport.disconnect()

    async def _pump(self) -> None:
        cfg = self._config
        self._inflight.clear()
        self._mids.clear()
        self._query_mids.clear()
        # Every unreceipted order goes out again on a new connection.
        await self._outbox.flush()
        await self._outbox.make_all_due()
        geo = self.regions
        while self._transport.connected:
            if geo is not None:
                leaving = self._transport
                if self._switch_region_if_due():
                    await leaving.disconnect()
                    return
            self._wake.clear()
            now = self._clock.monotonic_s()
            for order_id, deadline in list(self._inflight.items()):
                if deadline <= now:
                    del self._inflight[order_id]
                    self._metrics.receipt_timeouts.inc()
                    self._spans.end(order_id, "receipt_timeout", failed=True)
            timeout = cfg.poll_interval_s
            free = cfg.max_inflight - len(self._inflight)
            if free > 0:
                tokens = self._bucket.take_up_to(free)
                sent = await self._send_due(tokens) if tokens else 0
                self._bucket.give_back(tokens - sent)
                if sent and sent == tokens:
                    continue  # there may be more due right away
                if not tokens:
                    timeout = min(timeout, self._bucket.seconds_until(1))
            if self._inflight:
                timeout = min(timeout, max(0.0, min(self._inflight.values()) - now))
            if geo is not None:
                timeout = min(timeout, geo.seconds_until_failover())
            try:
                async with asyncio.timeout(max(timeout, 0.001)):
                    await self._wake.wait()
            except TimeoutError:
                pass
        log.warning("mqtt_connection_lost", inflight=len(self._inflight))
        self._spans.end_all("connection_lost")

    def horizon_ms(self) -> int:
        """Agent-clock ms: orders first sent at or before it must never be sent again."""
        return self._clock.now_ms() - int(self._config.resend_max_age_s * 1000)

    async def _send_due(self, limit: int) -> int:
        due = await self._outbox.due(
            self._clock.now_ms(), limit, set(self._inflight), self.horizon_ms()
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
            traceparent = self._spans.begin(order.order_id, order.traceparent)
            try:
                mid = self._transport.publish(self._orders_topic, payload, traceparent)
            except BrokerError as exc:
                log.warning("publish_failed", order_id=order.order_id, error=exc.detail)
                self._spans.end(order.order_id, "publish_failed", failed=True)
                break
            if self.regions is not None:
                self.regions.on_sent()
            self._inflight[order.order_id] = self._clock.monotonic_s() + timeout_s
            self._mids[mid] = (order.order_id, order.sends)
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
        self._query_mids.add(mid)
        self._metrics.status_queries.inc()
        return True

    # --- TransportHandlers: called on the event loop by the transport ---------

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        if mid in self._query_mids:
            self._query_mids.discard(mid)
            if reason_code >= 0x80:
                # The query is asked again after its backoff; the ACL may need fixing.
                self.last_rejection = f"status query: PUBACK {reason_code} {reason}"
                log.warning("status_query_refused", reason_code=reason_code, reason=reason)
            return
        sent = self._mids.pop(mid, None)
        if sent is None:
            return
        order_id, earlier_sends = sent
        action = classify(reason_code)
        if action is PubackAction.DELIVERED:
            return
        # The broker did not deliver it: no receipt will come for this send.
        self._metrics.broker_rejections.labels(str(reason_code)).inc()
        self._inflight.pop(order_id, None)
        self._spans.end(order_id, f"puback_{reason_code}", failed=True)
        if self.regions is not None and reason_code != NO_MATCHING_SUBSCRIBERS:
            # 0x10 means no bridge is subscribed in this region: not an answer,
            # so the no-answer clock keeps running and the agent fails over.
            self.regions.on_answer(len(self._inflight))
        self.last_rejection = f"{order_id}: PUBACK {reason_code} {reason}"
        if action is PubackAction.HOLD:
            log.error(
                "order_held_by_broker_refusal",
                order_id=order_id,
                reason_code=reason_code,
                reason=reason,
            )
            self._outbox.hold(order_id, f"puback_{reason_code}")
        else:
            # Backoff per order (its sends so far), not one shared count: a burst of
            # refusals (a window of 100 orders, the bridge not yet subscribed) would
            # otherwise push every order to the cap at once.
            cfg = self._config
            delay_s = full_jitter(
                earlier_sends, cfg.puback_retry_min_s, cfg.puback_retry_max_s, self._rng
            )
            log.warning(
                "order_refused_transiently",
                order_id=order_id,
                reason_code=reason_code,
                reason=reason,
                retry_in_s=round(delay_s, 3),
            )
            retry_at = self._clock.now_ms() + int(delay_s * 1000)
            self._outbox.defer(order_id, retry_at, f"puback_{reason_code}")
        self._wake.set()

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic == self._receipts_topic:
                self._on_receipt(payload)
            elif topic == self._status_topic:
                status = decode_status(payload)
                self._metrics.statuses.labels(status.status).inc()
                query_at = None if status.status in TERMINAL_STATUSES else self._query_at()
                self._outbox.set_status(status.order_id, status.status, status.reason, query_at)
                # A status settles the order too (its receipt may be lost): stop waiting.
                if self._inflight.pop(status.order_id, None) is not None:
                    self._spans.end(status.order_id, f"status_{status.status}")
                    if self.regions is not None:
                        self.regions.on_answer(len(self._inflight))
            else:
                log.warning("unexpected_topic", topic=topic)
        except DecodeError as exc:
            self._metrics.invalid_messages.inc()
            log.warning(
                "invalid_message", topic=topic, reason=exc.reason, payload=truncate(payload)
            )

    def _on_receipt(self, payload: bytes) -> None:
        receipt = decode_receipt(payload)
        self._metrics.receipts.labels(receipt.result).inc()
        order_id = receipt.order_id
        if order_id is None:
            log.warning("receipt_without_order_id", reason=receipt.reason)
            return
        self._inflight.pop(order_id, None)
        self._spans.end(order_id, receipt.result, failed=receipt.result == "rejected")
        if self.regions is not None:
            self.regions.on_answer(len(self._inflight))
        if receipt.result != "pending":
            self._pending_streak.pop(order_id, None)
        if receipt.result in ("accepted", "duplicate"):
            self._outbox.settle(order_id, "accepted", None, self._query_at())
        elif receipt.result == "pending":
            # Geo mode: the order's authority region is unreachable. Keep it and
            # resend with backoff per order, in whatever region is current then.
            streak = self._pending_streak.get(order_id, 0)
            if len(self._pending_streak) >= MAX_PENDING_STREAKS:
                self._pending_streak.clear()  # orders settled elsewhere (expiry): start over
            self._pending_streak[order_id] = streak + 1
            cfg = self._config
            delay_s = full_jitter(
                streak, cfg.pending_retry_min_s, cfg.pending_retry_max_s, self._rng
            )
            # At least the minimum: a whole in-flight window must not come straight back.
            delay_s = max(delay_s, cfg.pending_retry_min_s / 2)
            log.info(
                "order_pending",
                order_id=order_id,
                reason=receipt.reason,
                retry_in_s=round(delay_s, 3),
            )
            retry_at = self._clock.now_ms() + int(delay_s * 1000)
            self._outbox.defer(order_id, retry_at, receipt.reason or Reason.AUTHORITY_UNREACHABLE)
        elif receipt.reason == Reason.RATE_LIMITED:
            retry_at = self._clock.now_ms() + int(self._config.rate_limited_retry_s * 1000)
            self._outbox.defer(order_id, retry_at, receipt.reason)
        else:
            log.error("order_rejected", order_id=order_id, reason=receipt.reason)
            self._outbox.settle(order_id, "rejected", receipt.reason)
        self._wake.set()

    def _query_at(self) -> int:
        # When to ask for a terminal status that has not come (agent clock).
        return self._clock.now_ms() + int(self._config.status_query_delay_s * 1000)

    def on_connection_lost(self, reason: str) -> None:
        self.last_error = f"connection lost: {reason}"
        self._wake.set()


def with_attempts(payload: bytes, attempts: tuple[str, ...]) -> bytes:
    """The stored Order ``payload`` re-encoded with geo ``attempts`` (deterministic bytes).

    Raises:
        SchemaError: ``too_large`` if the attempts push it past the order size cap.
    """
    order = decode_order(payload)
    return encode(msgspec.structs.replace(order, attempts=attempts))


class _Deaf:
    """Handlers of a probe connection: it publishes nothing and subscribes to nothing."""

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        pass

    def on_message(self, topic: str, payload: bytes) -> None:
        pass

    def on_connection_lost(self, reason: str) -> None:
        pass
