"""Where a worker's statuses go with several brokers: publish to every broker, or look up one.

Not a test. Two ways for a pipeline worker to reach a device connected to one
of a region's brokers (docs/explanation/brokers.md):

- fan-out: publish each status to every broker (pipeline.brokers.StatusFanout);
  the broker without the device drops it. Its cost over one broker is the
  extra PUBLISH per broker: measured as the worker's CPU per status, and the
  brokers' CPU, with 1 and with 2 brokers (nobody subscribed: what the device's
  own broker then spends delivering is the same for both ways).
  "servers" is the CPU of the brokers and, for the look-up, of Redis.
- look-up: keep each device's broker in Redis (written from its health and
  Will) and read it before publishing: one HGET per status, pipelined per
  batch of ``--batch`` (the worker's batch), plus the one PUBLISH.

Statuses are published in batches of ``--batch`` and the worker waits for
every PUBACK, as ``MqttStatusPublisher.publish`` does.

Run: .venv/bin/python -m bench.status_brokers [--statuses 50000] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from pipeline.brokers import StatusFanout
from schemas import Status, encode
from servicekit.mqtt import MqttClient
from servicekit.urls import MqttUrl
from testrig.procstat import process_cpu_s
from testrig.servers import MosquittoProcess, RedisProcess

PAYLOAD = encode(Status(v=1, order_id="o-0000000000000000", status="fulfilled", reason=None, at=1))


def _client(url: str, name: str) -> MqttClient:
    return MqttClient(MqttUrl.parse(url), client_id=name, clean_start=True, session_expiry_s=0,
                      max_queued=1_000_000, name=name)  # fmt: skip


async def _publish_all(
    send: StatusFanout | MqttClient, statuses: int, batch: int, redis: aioredis.Redis | None
) -> None:
    for start in range(0, statuses, batch):
        devices = [f"dev-{(start + i) % 10_000:05d}" for i in range(batch)]
        if redis is not None:  # look-up: where is each device connected?
            async with redis.pipeline(transaction=False) as pipe:
                for device in devices:
                    pipe.hget(f"device:{{{device}}}", "broker")
                await pipe.execute()
        acks = [send.publish_acked(f"v1/devices/{d}/status", PAYLOAD) for d in devices]
        await asyncio.gather(*acks)


async def measure(
    urls: list[str], broker_pids: list[int | None], redis_url: str | None, statuses: int,
    batch: int,
) -> tuple[float, float, float]:  # fmt: skip
    """Worker CPU µs per status, servers' (brokers', Redis's) CPU µs per status, statuses/s."""
    clients = [_client(url, f"bench-{i}") for i, url in enumerate(urls)]
    redis = aioredis.from_url(redis_url) if redis_url else None
    for client in clients:
        await client.__aenter__()
    try:
        send: StatusFanout | MqttClient = clients[0] if len(clients) == 1 else StatusFanout(clients)
        if redis is not None:
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(10_000):
                    pipe.hset(f"device:{{dev-{i:05d}}}", "broker", "0")
                await pipe.execute()
        await _publish_all(send, batch * 10, batch, redis)  # warm up
        brokers_before = sum(process_cpu_s(pid) for pid in broker_pids)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        await _publish_all(send, statuses, batch, redis)
        cpu = time.process_time() - cpu_before
        wall = time.perf_counter() - wall_before
        brokers = sum(process_cpu_s(pid) for pid in broker_pids) - brokers_before
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
        if redis is not None:
            await redis.aclose()
    return cpu / statuses * 1e6, brokers / statuses * 1e6, statuses / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statuses", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        brokers = [MosquittoProcess(Path(tmp) / f"m{i}") for i in range(2)]
        redis = RedisProcess(Path(tmp) / "redis")
        for server in (*brokers, redis):
            server.start()
        try:
            pids = [b.pid for b in brokers]
            cases = {
                "1 broker": ([brokers[0].url], pids[:1], None),
                "fan-out to 2 brokers": ([b.url for b in brokers], pids, None),
                "look-up in Redis + 1 broker": ([brokers[0].url], [pids[0], redis.pid], redis.url),
            }
            print(f"{args.statuses:,} statuses in batches of {args.batch}, PUBACKs awaited")
            print(f"{'case':<30}{'worker µs/status':>18}{'servers µs/status':>19}{'status/s':>10}")
            for name, (urls, broker_pids, redis_url) in cases.items():
                worker, broker, rate = asyncio.run(
                    measure(urls, broker_pids, redis_url, args.statuses, args.batch)
                )
                print(f"{name:<30}{worker:>18.1f}{broker:>19.1f}{rate:>10,.0f}")
        finally:
            for server in (*brokers, redis):
                server.stop()


if __name__ == "__main__":
    main()
