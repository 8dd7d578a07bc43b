"""A rogue device: malformed and spoofed payloads that must end in ``orders:dlq``, never a stream.

Three kinds, in turn: bytes that are not MessagePack (``malformed``), a map
that breaks the schema (``invalid_schema``), and a valid order naming another
device than the topic's (``device_mismatch``, the spoof).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import msgspec

from edge_agent.transport import TransportSettings, default_transport
from schemas import Item, Order, encode
from schemas.names import orders_topic, receipts_topic
from servicekit.clock import now_ms
from servicekit.urls import MqttUrl

from .verify import OrderRef

RECEIPT_WAIT_S = 15.0


@dataclass
class RogueReport:
    """What one rogue burst sent, and the spoofed orders that must appear nowhere."""

    device_id: str
    sent: int = 0
    receipts: int = 0
    spoofed: list[OrderRef] = field(default_factory=list)


class _Handlers:
    def __init__(self) -> None:
        self.receipts = 0
        self.changed = asyncio.Event()

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        pass

    def on_message(self, topic: str, payload: bytes) -> None:
        self.receipts += 1
        self.changed.set()

    def on_connection_lost(self, reason: str) -> None:
        self.changed.set()


def rogue_payload(index: int, victim: str) -> tuple[bytes, OrderRef | None]:
    """The ``index``-th rogue payload, and the order it spoofs (if it is a spoof)."""
    match index % 3:
        case 0:
            return b"\xc1" + os.urandom(16), None  # 0xc1 is never valid MessagePack
        case 1:
            bad = {"v": 1, "order_id": f"rogue{index:08d}", "items": "none"}
            return msgspec.msgpack.encode(bad), None
    order_id = f"spoof{os.urandom(8).hex()}"
    order = Order(
        v=1, order_id=order_id, device_id=victim, seq=index,
        created_at=now_ms(), currency="EUR",
        items=(Item("COLA-33", 1, 150),), total=150,
    )  # fmt: skip
    return encode(order), (victim, order_id)


async def send_rogue(mqtt_url: str, device_id: str, count: int, victims: list[str]) -> RogueReport:
    """Publish ``count`` rogue payloads on ``device_id``'s orders topic; wait for their receipts."""
    report = RogueReport(device_id)
    handlers = _Handlers()
    settings = TransportSettings(
        url=MqttUrl.parse(mqtt_url),
        client_id=f"{device_id}-c",
        subscriptions=(receipts_topic(device_id),),
        session_expiry_s=60,
    )
    transport = default_transport(settings, handlers)
    await transport.connect()
    try:
        for i in range(count):
            payload, spoofed = rogue_payload(i, victims[i % len(victims)] if victims else "x")
            transport.publish(orders_topic(device_id), payload)
            report.sent += 1
            if spoofed is not None:
                report.spoofed.append(spoofed)
        deadline = time.monotonic() + RECEIPT_WAIT_S
        while handlers.receipts < count and time.monotonic() < deadline:
            handlers.changed.clear()
            try:
                await asyncio.wait_for(handlers.changed.wait(), 0.5)
            except TimeoutError:
                continue
    finally:
        report.receipts = handlers.receipts
        await transport.disconnect()
    return report
