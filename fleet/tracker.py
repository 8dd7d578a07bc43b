"""What the simulated devices saw: accepted orders, receipts, statuses and their latencies.

The agent's ``transport_factory`` seam is where we listen: :class:`ObservingTransport`
wraps the real paho transport, so every order the agent publishes and every
receipt or status the broker delivers passes through here on the way to the
agent's own handlers, untouched. No agent internals are read or changed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from edge_agent.transport import Transport, TransportHandlers
from schemas import DecodeError, decode_receipt, decode_status

from .verify import OrderRef

TERMINAL = frozenset({"rejected", "failed", "fulfilled"})
RECENT = 5_000  # latencies kept for the live p50/p99


class _OrderId(msgspec.Struct):
    order_id: str


_order_id = msgspec.msgpack.Decoder(_OrderId)


@dataclass
class Tracker:
    """Shared by every simulated device of a run; touched only on the event loop."""

    submit_at: dict[OrderRef, float] = field(default_factory=dict)
    accepted: list[OrderRef] = field(default_factory=list)
    receipted: set[OrderRef] = field(default_factory=set)
    terminal: set[OrderRef] = field(default_factory=set)
    payloads: dict[OrderRef, tuple[str, bytes]] = field(default_factory=dict)
    receipt_latency_ms: list[float] = field(default_factory=list)
    e2e_latency_ms: list[float] = field(default_factory=list)
    recent_receipt_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_e2e_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    # Receipts and statuses that beat the agent's ``queued`` answer back to us (a busy
    # event loop resumes the submitter late): both kept, settled when it comes.
    early_receipt: dict[OrderRef, float] = field(default_factory=dict)
    early_status: dict[OrderRef, float] = field(default_factory=dict)
    # For the report's stage breakdown (monotonic s; wall = monotonic + wall_offset_s).
    published_at: dict[OrderRef, float] = field(default_factory=dict)  # first PUBLISH
    terminal_at: dict[OrderRef, float] = field(default_factory=dict)
    # When the pipeline set each heard terminal status (the Status's ``at``: its wall clock,
    # ms), so the last stage splits into the pipeline's work and the status's delivery.
    status_set_at: dict[OrderRef, int] = field(default_factory=dict)
    wall_offset_s: float = field(default_factory=lambda: time.time() - time.monotonic())
    refused: int = 0
    duplicate_receipts: int = 0
    rejected_receipts: int = 0
    # Monotonic times of every connection attempt, and of each device's latest success.
    connect_attempts: list[float] = field(default_factory=list)
    connected_at: dict[str, float] = field(default_factory=dict)

    def connect_attempt(self) -> None:
        """A device's agent started a connection attempt."""
        self.connect_attempts.append(time.monotonic())

    def connect_succeeded(self, device_id: str) -> None:
        """A device's connection attempt succeeded (CONNACK)."""
        self.connected_at[device_id] = time.monotonic()

    def reconnected_since(self, t0: float) -> tuple[int, float | None]:
        """How many devices connected at or after ``t0``, and when the last of them did."""
        back = [t for t in self.connected_at.values() if t >= t0]
        return len(back), max(back, default=None)

    def add_latencies(self, receipt_ms: list[float], e2e_ms: list[float]) -> None:
        """Latencies measured elsewhere (a worker process) join this run's record."""
        self.receipt_latency_ms.extend(receipt_ms)
        self.recent_receipt_ms.extend(receipt_ms)
        self.e2e_latency_ms.extend(e2e_ms)
        self.recent_e2e_ms.extend(e2e_ms)

    def queued(self, ref: OrderRef, submitted_at: float) -> None:
        """The agent answered ``queued`` (the HTTP 202) for ``ref``."""
        self.submit_at[ref] = submitted_at
        self.accepted.append(ref)
        # A receipt, and even the terminal status, may beat the bookkeeping; settle them now.
        if (at := self.early_receipt.pop(ref, None)) is not None:
            self._receipt(ref, at)
        if (at := self.early_status.pop(ref, None)) is not None:
            self._terminal(ref, at)

    def placed(self, ref: OrderRef, at: float, topic: str, payload: bytes) -> None:
        """A light device placed ``ref`` (``payload`` on ``topic``) in its outbox: like
        :meth:`queued`, but before its first send, so nothing can have answered it yet."""
        self.submit_at[ref] = at
        self.accepted.append(ref)
        self.payloads[ref] = (topic, payload)

    def receipt(self, ref: OrderRef, result: str) -> None:
        """A receipt arrived for ``ref``."""
        if result == "duplicate":
            self.duplicate_receipts += 1
        if result == "pending":
            return  # geo mode: the device keeps the order and retries it
        if result not in ("accepted", "duplicate"):
            self.rejected_receipts += 1
            return
        if ref not in self.submit_at:
            self.early_receipt.setdefault(ref, time.monotonic())
            return
        self._receipt(ref, time.monotonic())

    def status(self, ref: OrderRef, status: str, set_at_ms: int | None = None) -> None:
        """A pipeline status arrived for ``ref`` (set by the pipeline at ``set_at_ms``)."""
        if status not in TERMINAL:
            return
        if set_at_ms is not None:
            self.status_set_at.setdefault(ref, set_at_ms)
        if ref not in self.submit_at:
            self.early_status.setdefault(ref, time.monotonic())
            return
        self._terminal(ref, time.monotonic())

    def _receipt(self, ref: OrderRef, at: float) -> None:
        if ref in self.receipted:
            return
        self.receipted.add(ref)
        ms = (at - self.submit_at[ref]) * 1000
        self.receipt_latency_ms.append(ms)
        self.recent_receipt_ms.append(ms)

    def _terminal(self, ref: OrderRef, at: float) -> None:
        if ref in self.terminal:
            return
        self.terminal.add(ref)
        self.terminal_at[ref] = at
        ms = (at - self.submit_at[ref]) * 1000
        self.e2e_latency_ms.append(ms)
        self.recent_e2e_ms.append(ms)


class ObservingHandlers:
    """Forwards the transport's callbacks to the agent after noting receipts and statuses."""

    def __init__(self, device_id: str, inner: TransportHandlers, tracker: Tracker) -> None:
        self._device_id = device_id
        self._inner = inner
        self._tracker = tracker

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        self._inner.on_puback(mid, reason_code, reason)

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic.endswith("/receipts"):
                receipt = decode_receipt(payload)
                if receipt.order_id is not None:
                    self._tracker.receipt((self._device_id, receipt.order_id), receipt.result)
            elif topic.endswith("/status"):
                status = decode_status(payload)
                self._tracker.status((self._device_id, status.order_id), status.status, status.at)
        except DecodeError:
            pass  # the agent's own handler counts and logs it
        self._inner.on_message(topic, payload)

    def on_connection_lost(self, reason: str) -> None:
        self._inner.on_connection_lost(reason)


class ObservingTransport:
    """The real transport, remembering each order payload it publishes (for the dup flood)."""

    def __init__(self, device_id: str, inner: Transport, tracker: Tracker) -> None:
        self._device_id = device_id
        self._inner = inner
        self._tracker = tracker

    @property
    def connected(self) -> bool:
        return self._inner.connected

    @property
    def protocol(self) -> str:
        return self._inner.protocol

    async def connect(self) -> bool:
        self._tracker.connect_attempt()
        session_present = await self._inner.connect()
        self._tracker.connect_succeeded(self._device_id)
        return session_present

    def publish(self, topic: str, payload: bytes, traceparent: str | None = None) -> int:
        try:
            order_id = _order_id.decode(payload).order_id
            self._tracker.payloads[(self._device_id, order_id)] = (topic, payload)
            self._tracker.published_at.setdefault((self._device_id, order_id), time.monotonic())
        except msgspec.DecodeError:
            pass
        return self._inner.publish(topic, payload, traceparent)

    def resend(self, topic: str, payload: bytes) -> int:
        """Publish raw bytes as the agent would, without the agent knowing (duplicate flood)."""
        return self._inner.publish(topic, payload)

    async def disconnect(self) -> None:
        await self._inner.disconnect()
