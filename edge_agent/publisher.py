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
"""

from __future__ import annotations

import asyncio
import random

import structlog

from schemas import DecodeError, Reason, StatusQuery, decode_receipt, decode_status, encode, names
from servicekit import tracing
from servicekit.backoff import Backoff, full_jitter
from servicekit.logs import truncate
from servicekit.tokens import TokenBucket
from servicekit.urls import MqttUrl

from ._puback import PubackAction, classify
from ._records import TERMINAL_STATUSES
from .config import AgentConfig
from .errors import BrokerError, StorageError
from .metrics import AgentMetrics
from .outbox import Outbox
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
        settings = TransportSettings(
            url=self.url,
            client_id=config.mqtt_client_id,
            subscriptions=(self._receipts_topic, self._status_topic),
            keepalive_s=config.keepalive_s,
            session_expiry_s=config.session_expiry_s,
            connect_timeout_s=config.connect_timeout_s,
            max_inflight=config.max_inflight,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )
        self._transport: Transport = transport_factory(settings, self)
        # At most one second's worth at once, so a backlog never leaves in a burst.
        rate_per_s = config.drain_rate_per_min / 60.0
        self._bucket = TokenBucket(rate_per_s, burst=min(config.max_inflight, rate_per_s))
        self._inflight: dict[str, float] = {}  # order_id -> receipt deadline (monotonic)
        self._mids: dict[int, tuple[str, int]] = {}  # mid -> (order_id, earlier sends)
        self._query_mids: set[int] = set()
        self._wake = asyncio.Event()
        self._reconnect = Backoff(config.reconnect_min_s, config.reconnect_max_s, self._rng)
        self.last_error: str | None = None
        self.last_rejection: str | None = None
        self._spans = tracing.pending_spans("order publish")  # publish → receipt

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
        """Connect, pump, reconnect with capped full-jitter backoff; forever, for any outage."""
        while True:
            try:
                session_present = await self._transport.connect()
            except BrokerError as exc:
                self.last_error = exc.detail
                self._metrics.connect_failures.inc()
                delay = self._reconnect.next_delay()
                log.warning("mqtt_connect_failed", error=exc.detail, retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            self._reconnect.reset()
            self.last_error = None
            self._metrics.connects.inc()
            log.info(
                "mqtt_connected",
                url=str(self.url),
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
            await self._reconnect.wait()

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
        while self._transport.connected:
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
        sent = 0
        for order in due:
            if not self._transport.connected:
                break
            traceparent = self._spans.begin(order.order_id, order.traceparent)
            try:
                mid = self._transport.publish(self._orders_topic, order.payload, traceparent)
            except BrokerError as exc:
                log.warning("publish_failed", order_id=order.order_id, error=exc.detail)
                self._spans.end(order.order_id, "publish_failed", failed=True)
                break
            self._inflight[order.order_id] = self._clock.monotonic_s() + timeout_s
            self._mids[mid] = (order.order_id, order.attempts)
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
        if receipt.result in ("accepted", "duplicate"):
            self._outbox.settle(order_id, "accepted", None, self._query_at())
        elif receipt.result == "pending" or receipt.reason == Reason.RATE_LIMITED:
            # `pending` (geo mode): the authority region is unreachable; keep it.
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
