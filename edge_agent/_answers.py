"""What comes back for the publisher's sends: PUBACKs, receipts and statuses.

A PUBACK error code is classified in ``_puback.py``: transient codes defer
the order by a capped backoff per order, definitive ones hold it. A receipt
settles the order (``accepted``/``duplicate``/``rejected``), defers it
(``rate_limited``), or in geo mode keeps it for a later resend (``pending``, and
``rejected`` with reason ``unknown_region`` from a bridge of an earlier release).
A status settles it too, since its receipt may be lost. Every time here is the
agent clock (``_clock.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

import structlog

from schemas import DecodeError, Reason, decode_receipt, decode_status, names
from servicekit.backoff import full_jitter
from servicekit.logs import truncate

from ._puback import NO_MATCHING_SUBSCRIBERS, PubackAction, classify
from ._records import TERMINAL_STATUSES
from ._window import Window
from .config import AgentConfig
from .metrics import AgentMetrics
from .outbox import Outbox
from .regions import RegionSelector

log = structlog.get_logger(__name__)

# Per-order `pending` counts kept for backoff; beyond this many, forget them all.
MAX_PENDING_STREAKS: Final = 100_000


class Answers:
    """The publisher's transport handlers for PUBACKs and messages; ``wake`` on every change."""

    def __init__(
        self,
        config: AgentConfig,
        outbox: Outbox,
        metrics: AgentMetrics,
        window: Window,
        *,
        regions: RegionSelector | None,
        wake: Callable[[], None],
        rng: random.Random,
    ) -> None:
        self._config = config
        self._outbox = outbox
        self._metrics = metrics
        self._window = window
        self._regions = regions
        self._wake = wake
        self._rng = rng
        self._clock = outbox.clock
        self._receipts_topic = names.receipts_topic(config.device_id)
        self._status_topic = names.status_topic(config.device_id)
        self._pending_streak: dict[str, int] = {}  # order_id -> `pending` receipts in a row
        self.last_rejection: str | None = None

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        window = self._window
        if mid in window.queries:
            window.queries.discard(mid)
            if reason_code >= 0x80:
                # The query is asked again after its backoff; the ACL may need fixing.
                self.last_rejection = f"status query: PUBACK {reason_code} {reason}"
                log.warning("status_query_refused", reason_code=reason_code, reason=reason)
            return
        sent = window.orders.pop(mid, None)
        if sent is None:
            return
        order_id, earlier_sends = sent
        action = classify(reason_code)
        if action is PubackAction.DELIVERED:
            return
        # The broker did not deliver it: no receipt will come for this send.
        self._metrics.broker_rejections.labels(str(reason_code)).inc()
        window.receipts.pop(order_id, None)
        window.spans.end(order_id, f"puback_{reason_code}", failed=True)
        if self._regions is not None and reason_code != NO_MATCHING_SUBSCRIBERS:
            # 0x10 means no bridge is subscribed in this region: not an answer,
            # so the no-answer clock keeps running and the agent fails over.
            self._regions.on_answer(len(window.receipts))
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
        self._wake()

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
                if self._window.receipts.pop(status.order_id, None) is not None:
                    self._window.spans.end(status.order_id, f"status_{status.status}")
                    if self._regions is not None:
                        self._regions.on_answer(len(self._window.receipts))
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
        self._window.receipts.pop(order_id, None)
        self._window.spans.end(order_id, receipt.result, failed=receipt.result == "rejected")
        if self._regions is not None:
            self._regions.on_answer(len(self._window.receipts))
        # A bridge of an earlier release rejects an order whose home region it does not
        # know; the order itself is valid, so it waits as if `pending` (GEO.md).
        waits = receipt.result == "pending" or (
            receipt.result == "rejected" and receipt.reason == Reason.UNKNOWN_REGION
        )
        if not waits:
            self._pending_streak.pop(order_id, None)
        if receipt.result in ("accepted", "duplicate"):
            self._outbox.settle(order_id, "accepted", None, self._query_at())
        elif waits:
            # Geo mode: the order's authority region is unreachable, or unknown to the
            # bridge. Keep it and resend with backoff per order, in whatever region is
            # current then.
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
        self._wake()

    def _query_at(self) -> int:
        # When to ask for a terminal status that has not come (agent clock).
        return self._clock.now_ms() + int(self._config.status_query_delay_s * 1000)
