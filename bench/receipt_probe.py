"""The lean receipt-latency probe: one client publishes orders at a steady rate to a running
bridge and times each order → receipt round trip.

Not a test. It sees what a device sees at light load: the publish, the broker's
hops, the bridge's batcher (group commit: an idle bridge writes at once), its
Redis write, the receipt back. The client sets TCP_NODELAY, as every client we
ship does; Nagle's algorithm against delayed ACKs used to put a ~40 ms floor
under every receipt.

Run against a bridge you started:
.venv/bin/python -m bench.receipt_probe --mqtt-url mqtt://127.0.0.1:1883 [--rate 50 --seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Final

from schemas import Item, Order, decode_receipt, encode
from schemas.names import orders_topic, receipts_topic
from servicekit.clock import now_ms
from servicekit.mqtt import Ack, MqttClient, Subscription
from servicekit.urls import MqttUrl

RECEIPT_P50_GOAL_MS: Final = 7.0


@dataclass(frozen=True)
class ProbeResult:
    """Round trips in ms, sorted, and how many orders got no receipt in time."""

    latencies_ms: list[float]
    missing: int

    def percentile(self, p: float) -> float:
        values = self.latencies_ms
        return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def _order(device_id: str, seq: int) -> Order:
    item = Item(sku="sku-cola-330ml", qty=2, unit_price=150)
    return Order(v=1, order_id=f"p{uuid.uuid4().hex[:20]}", device_id=device_id, seq=seq,
                 created_at=now_ms(), currency="EUR", items=(item,),
                 total=300)  # fmt: skip


async def probe_receipts(url: str, *, rate: float = 50.0, seconds: float = 10.0) -> ProbeResult:
    """Publish ``rate`` orders/s for ``seconds``; return the order → receipt times."""
    device_id = f"probe-{uuid.uuid4().hex[:8]}"
    sent: dict[str, float] = {}
    latencies: list[float] = []
    all_back = asyncio.Event()
    publishing = True

    def on_receipt(_topic: str, payload: bytes, ack: Ack) -> None:
        ack()
        receipt = decode_receipt(payload)
        started = sent.pop(receipt.order_id or "", None)
        if started is not None:
            latencies.append((time.perf_counter() - started) * 1000)
        if not sent and not publishing:
            all_back.set()

    client = MqttClient(
        MqttUrl.parse(url),
        client_id=device_id,
        subscriptions=[Subscription(receipts_topic(device_id), on_receipt)],
        clean_start=True,
        session_expiry_s=0,
    )
    async with client:
        # Warm-up: until a first receipt comes back, the bridge may not be subscribed.
        async with asyncio.timeout(60):
            while not latencies:
                order = _order(device_id, 0)
                sent[order.order_id] = time.perf_counter()
                client.publish(orders_topic(device_id), encode(order))
                await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)
        sent.clear()
        latencies.clear()
        interval = 1 / rate
        next_at = time.perf_counter()
        for seq in range(1, int(rate * seconds) + 1):
            order = _order(device_id, seq)
            sent[order.order_id] = time.perf_counter()
            client.publish(orders_topic(device_id), encode(order))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        publishing = False
        if sent:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await all_back.wait()
    return ProbeResult(sorted(latencies), len(sent))


def main() -> None:
    """Probe a running bridge and print p50/p99."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(probe_receipts(args.mqtt_url, rate=args.rate, seconds=args.seconds))
    print(f"receipts: p50 {result.percentile(0.5):.1f} ms, p99 {result.percentile(0.99):.1f} ms,"
          f" {len(result.latencies_ms)} timed, {result.missing} missing")  # fmt: skip


if __name__ == "__main__":
    main()
