"""CPU per order that tracing adds to the bridge's own Python path, measured in process.

Not a test. The tracing rows of ``bench/bridge_throughput.py`` time the whole
bridge, but on a shared 2-core machine their noise (±10 %) is larger than the
costs in question. This bench times the parts tracing touches with CPU time
(``time.process_time``, best of several repeats, variants interleaved):

- per message: ``mqtt5`` parse → user property lookup → classify (with the
  shape check) → the script's MessagePack row, for the code before tracing
  (no property read), the code now without a property, and with one;
- per batch: :func:`servicekit.tracing.batch_span` over a 500-order batch with
  tracing off, on at 1 % and at 100 % (in-memory exporter: export encoding
  and HTTP are not included).

Run: .venv/bin/python -m bench.tracing_cost
"""

from __future__ import annotations

import random
import statistics
import time
import timeit
from collections.abc import Callable

import mqtt5
import msgspec
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench._loadgen import bench_order
from bridge.batcher import _Entry, _links
from bridge.ingest import classify
from schemas.names import TRACEPARENT_PROPERTY
from servicekit import tracing
from servicekit.mqtt import user_property

_encoder = msgspec.msgpack.Encoder()
N = 50_000
BATCH = 500


def _packet(index: int, traced: bool) -> bytes:
    topic, payload = bench_order(0, index, 100)
    props = [(TRACEPARENT_PROPERTY, tracing.new_traceparent(sampled=False))] if traced else None
    return mqtt5.PublishPacket(
        topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=5, user_properties=props
    ).write()


def before_tracing(raw: bytes) -> bytes:
    """The path as it was: no property read, six-field rows."""
    packet, _ = mqtt5.read(raw)
    o = classify(packet.topic, packet.payload, shards=16, received_at_ms=1)
    row = (o.digest, o.order_id, o.device_id, str(o.seq), str(o.received_at_ms), len(o.payload))
    return _encoder.encode([row])


def with_tracing(raw: bytes) -> bytes:
    """The path now (bridge tracing off): read the property, keep it if well shaped."""
    packet, _ = mqtt5.read(raw)
    trace = user_property(packet.user_properties, TRACEPARENT_PROPERTY)
    o = classify(packet.topic, packet.payload, shards=16, received_at_ms=1, trace=trace)
    row = (
        (o.digest, o.order_id, o.device_id, str(o.seq), str(o.received_at_ms), len(o.payload))
        if o.trace is None
        else (
            o.digest,
            o.order_id,
            o.device_id,
            str(o.seq),
            str(o.received_at_ms),
            len(o.payload),
            o.trace,
        )
    )  # fmt: skip  (as bridge/store.py builds the script's rows)
    return _encoder.encode([row])


def _cpu_us(run: Callable[[], object], number: int, per: int) -> float:
    timer = timeit.Timer(run, timer=time.process_time)
    return min(timer.repeat(number=number, repeat=5)) / number / per * 1e6


def per_message() -> dict[str, list[float]]:
    plain = [_packet(i, traced=False) for i in range(N)]
    traced = [_packet(i, traced=True) for i in range(N)]
    variants: dict[str, tuple[Callable[[bytes], bytes], list[bytes]]] = {
        "before tracing (no property)": (before_tracing, plain),
        "now, no property": (with_tracing, plain),
        "now, traceparent property": (with_tracing, traced),
    }
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):  # interleaved rounds
        for name, (path, raws) in variants.items():
            out[name].append(_cpu_us(lambda p=path, r=raws: [p(x) for x in r], 1, N))
    return out


def per_batch() -> dict[str, float]:
    rng = random.Random(7)
    out = {}
    for label, ratio, on in (("off", 0.01, False), ("1 %", 0.01, True), ("100 %", 1.0, True)):
        batch: list[_Entry] = []
        for i in range(BATCH):
            topic, payload = bench_order(0, i, 100)
            tp = tracing.new_traceparent(sampled=rng.random() < ratio)
            item = classify(topic, payload, shards=16, received_at_ms=1, trace=tp)
            batch.append((item, lambda _: None))
        memory = InMemorySpanExporter()
        tracing.configure("", sample_ratio=ratio, service_name="bench",
                          exporter=memory if on else None)  # fmt: skip

        def run(b: list[_Entry] = batch) -> None:
            with tracing.batch_span("bridge batch", _links(b)):
                pass

        out[label] = _cpu_us(run, 200 if ratio < 1 else 20, BATCH)
        tracing.shutdown()
    return out


def main() -> None:
    messages = per_message()
    base = statistics.median(messages["before tracing (no property)"])
    print(f"per message, bridge path (CPU µs, best of 5 × {N:,}; 3 interleaved rounds):")
    for name, values in messages.items():
        med = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:<32} {med:6.2f} µs  ({runs})  {med - base:+.2f} µs")
    print(f"per order, batch span over {BATCH} orders (CPU µs, before export):")
    for label, cost in per_batch().items():
        print(f"  tracing {label:<6} {cost:6.2f} µs")


if __name__ == "__main__":
    main()
