"""What a cross-region write costs: receipt latency and drain rate, home beside failover.

Not a test; the figures go in docs/explanation/benchmarks.md (geo).
One bridge of region ``b`` (one process, defaults otherwise) on one Mosquitto,
with three regions' Redis, each started from redis/redis.conf (AOF,
``appendfsync always``):

- ``b``: its own Redis (home: the local group commit);
- ``near``: another Redis over plain loopback (a cross-region write with no
  network cost: what the remote path itself costs);
- ``far``: a Redis behind :class:`testrig.proxy.TcpProxy` holding every chunk
  ``--wan-delay-ms`` each way (default 10 ms: a 20 ms round trip, two nearby
  cloud regions).

Receipts: one client publishes ``--probe-rate`` orders/s per authority for
``--probe-seconds``, cycling ``attempts=[b]``, ``[near]``, ``[far]`` (so the
rest of the machine's load hits all three alike), and times each
order → receipt round trip (p50/p99). Drain: ``--backlog`` orders queued in
the bridge's session, all owned by one region (all traffic failed over to
this bridge), drained by a fresh bridge; the rate is counted from the first to
the last stream entry in the authority's Redis; best of ``--rounds``.

Run: .venv/bin/python -m bench.geo [--backlog 10000 --rounds 2 --probe-seconds 4 --wan-delay-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import redis
from paho.mqtt.enums import CallbackAPIVersion

from bench._loadgen import create_session
from bench.bridge_throughput import _ready, stream_ids, total_entries
from bench.receipt_probe import ProbeResult
from schemas import Item, Order, decode_receipt, encode
from schemas.names import orders_topic, receipts_topic
from servicekit.clock import now_ms
from servicekit.mqtt import Ack, MqttClient, Subscription
from servicekit.urls import MqttUrl
from testrig.proxy import ProxyThread
from testrig.servers import REDIS_CONF, MosquittoProcess, RedisProcess, free_port

HOST = "127.0.0.1"
SHARDS = 16
ROOT = Path(__file__).resolve().parents[1]
LOG_LEVEL = "warning"


def _order(device_id: str, seq: int, authority: str) -> Order:
    item = Item(sku="sku-cola-330ml", qty=2, unit_price=150)
    return Order(v=1, order_id=f"g{uuid.uuid4().hex[:20]}", device_id=device_id, seq=seq,
                 created_at=now_ms(), currency="EUR", items=(item,), total=300,
                 attrs={"store": "central-station-7"}, attempts=(authority,))  # fmt: skip


@contextlib.contextmanager
def bridge(
    broker: MosquittoProcess, urls: dict[str, str], client_id: str, group: str, workdir: Path
) -> Iterator[None]:
    """``order-bridge`` of region ``b`` with every region's Redis, until the block ends."""
    proc = None
    for _attempt in range(3):  # a free port can be taken by someone else before we bind it
        port = free_port()
        argv = [
            sys.executable, "-m", "bridge.cli", "--mqtt-url", broker.url,
            "--shards", str(SHARDS), "--client-id", client_id, "--share-group", group,
            "--http-port", str(port), "--http-host", HOST, "--rate-per-s", "0",
            "--log-level", LOG_LEVEL, "--region", "b",
            *[arg for name, url in urls.items() for arg in ("--region-redis", f"{name}={url}")],
        ]  # fmt: skip
        with (workdir / f"{client_id}.log").open("ab") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not _ready(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if _ready(port):
            break
        proc.kill()
        proc.wait(10)
        proc = None
    if proc is None:
        raise RuntimeError((workdir / f"{client_id}.log").read_text()[-6000:])
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(20)


async def probe(
    url: str, authorities: tuple[str, ...], *, rate: float, seconds: float
) -> dict[str, ProbeResult]:
    """Publish ``rate`` orders/s per authority, interleaved; time each order → receipt.

    Interleaved, so load from the rest of the machine hits every authority alike.
    """
    device_id = f"geo-{uuid.uuid4().hex[:8]}"
    sent: dict[str, tuple[str, float]] = {}
    latencies: dict[str, list[float]] = {a: [] for a in authorities}
    results: dict[str, int] = {}
    all_back = asyncio.Event()
    publishing = True

    def on_receipt(_topic: str, payload: bytes, ack: Ack) -> None:
        ack()
        receipt = decode_receipt(payload)
        results[receipt.result] = results.get(receipt.result, 0) + 1
        authority, started = sent.pop(receipt.order_id or "", ("", 0.0))
        if authority:
            latencies[authority].append((time.perf_counter() - started) * 1000)
        if not sent and not publishing:
            all_back.set()

    def publish(seq: int, authority: str) -> None:
        order = _order(device_id, seq, authority)
        sent[order.order_id] = (authority, time.perf_counter())
        client.publish(orders_topic(device_id), encode(order))

    client = MqttClient(
        MqttUrl.parse(url),
        client_id=device_id,
        subscriptions=[Subscription(receipts_topic(device_id), on_receipt)],
        clean_start=True,
        session_expiry_s=0,
    )
    async with client:
        async with asyncio.timeout(60):  # warm-up: connections to every Redis made
            while not all(latencies.values()):
                for authority in authorities:
                    publish(0, authority)
                await asyncio.sleep(0.3)
        await asyncio.sleep(0.3)
        sent.clear()
        results.clear()
        for values in latencies.values():
            values.clear()
        interval, next_at = 1 / (rate * len(authorities)), time.perf_counter()
        for seq in range(1, int(rate * seconds) + 1):
            for authority in authorities:
                publish(seq, authority)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        publishing = False
        if sent:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await all_back.wait()
    if set(results) != {"accepted"}:
        raise RuntimeError(f"receipts other than accepted: {results}")
    missing = {a: sum(1 for owner, _ in sent.values() if owner == a) for a in authorities}
    return {a: ProbeResult(sorted(latencies[a]), missing[a]) for a in authorities}


def publish_backlog(broker: MosquittoProcess, authority: str, count: int, devices: int) -> None:
    """Queue ``count`` orders owned by ``authority`` at QoS 1 (acked by the broker)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"load-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(HOST, broker.port)
    client.loop_start()
    payloads = [
        (orders_topic(f"fo-{i % devices}"), encode(_order(f"fo-{i % devices}", i, authority)))
        for i in range(count)
    ]
    infos = [client.publish(topic, payload, qos=1) for topic, payload in payloads]
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def drain_rate(
    broker: MosquittoProcess,
    urls: dict[str, str],
    authority: str,
    count: int,
    workdir: Path,
) -> float:
    """Orders/s a fresh bridge writes a queued backlog owned by ``authority``."""
    target = redis.Redis.from_url(urls["b" if authority == "b" else "near"])
    target.flushall()
    tag = uuid.uuid4().hex[:6]
    client_id, group = f"drain-{authority}-{tag}", f"gd{tag}"
    create_session(HOST, broker.port, client_id, f"$share/{group}/v1/devices/+/orders")
    publish_backlog(broker, authority, count, devices=1000)
    with bridge(broker, urls, client_id, group, workdir):
        deadline = time.monotonic() + 300
        while total_entries(target) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {total_entries(target)} of {count} entries")
            time.sleep(0.02)
    ids = sorted(ms for ms, _ in stream_ids(target))
    target.close()
    return len(ids) / max(0.001, (ids[-1] - ids[0]) / 1000)


def main() -> None:
    """Run both measurements and print them side by side."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2, help="drain rounds; the best counts")
    parser.add_argument("--probe-rate", type=float, default=50.0)
    parser.add_argument("--probe-seconds", type=float, default=4.0)
    parser.add_argument("--wan-delay-ms", type=float, default=10.0, help="one way; RTT is 2×")
    args = parser.parse_args()
    rtt_ms = 2 * args.wan_delay_ms
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        broker = stack.enter_context(MosquittoProcess(work / "mq"))
        store_b = stack.enter_context(RedisProcess(work / "redis-b", conf=REDIS_CONF))
        store_near = stack.enter_context(RedisProcess(work / "redis-near", conf=REDIS_CONF))
        wan = ProxyThread(HOST, store_near.port, delay_s=args.wan_delay_ms / 1000)
        stack.callback(wan.close)
        urls = {
            "b": store_b.url,
            "near": store_near.url,
            "far": f"redis://{HOST}:{wan.proxy.port}/0",  # the same Redis, 2 × delay away
        }
        kinds = (
            ("home (attempts=[b])", "b"),
            ("cross-region, loopback", "near"),
            (f"cross-region, {rtt_ms:g} ms RTT", "far"),
        )
        tag = uuid.uuid4().hex[:6]
        with bridge(broker, urls, f"probe-{tag}", f"gp{tag}", work):
            probed = asyncio.run(
                probe(
                    broker.url,
                    tuple(a for _, a in kinds),
                    rate=args.probe_rate,
                    seconds=args.probe_seconds,
                )
            )
        rows = [(label, probed[authority]) for label, authority in kinds]
        # Best of --rounds: noise from the rest of the machine only ever slows a drain.
        best: dict[str, float] = {}
        for round_no in range(args.rounds):
            for label, authority in (
                ("home", "b"),
                ("failover, loopback", "near"),
                (f"failover, {rtt_ms:g} ms RTT", "far"),
            ):
                rate = drain_rate(broker, urls, authority, args.backlog, work)
                best[label] = max(best.get(label, 0.0), rate)
                print(f"round {round_no + 1} drain {label}: {rate:,.0f} orders/s", flush=True)
        rates = list(best.items())

    home_p50 = rows[0][1].percentile(0.5)
    home_rate = rates[0][1]
    print(f"\nreceipt latency ({args.probe_rate:g} orders/s per authority, interleaved, "
          f"{args.probe_seconds:g} s; Redis on redis/redis.conf, appendfsync always):")  # fmt: skip
    print(f"  {'authority':<30} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10}")
    for label, result in rows:
        p50, p99 = result.percentile(0.5), result.percentile(0.99)
        print(f"  {label:<30} {p50:>8.1f} {p99:>8.1f} {p50 - home_p50:>+10.1f}")
    print(f"\ndrain of {args.backlog:,} queued orders by one bridge, all owned by one region "
          f"(best of {args.rounds}):")  # fmt: skip
    for label, rate in rates:
        print(f"  {label:<30} {rate:>10,.0f} orders/s  ({rate / home_rate:.0%} of home)")


if __name__ == "__main__":
    main()
