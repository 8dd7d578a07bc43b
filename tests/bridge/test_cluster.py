"""The same bridge against a real 3-master Redis Cluster (redis-py's cluster client)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from pipeline.names import order_key
from pipeline.reshard import set_shards
from schemas import encode
from schemas.names import DLQ_STREAM, MANIFEST_KEY, orders_topic, seen_key, shard_of, stream_key
from servicekit.layout import Manifest, agree
from testrig.servers import MosquittoProcess
from tests.bridge.conftest import BridgeProcess, Publisher
from tests.helpers import make_order, wait_until_blocking


def test_ingest_on_a_redis_cluster(
    redis_cluster: list[int],
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: Callable[..., BridgeProcess],
) -> None:
    """Orders sent twice plus garbage land exactly once across shards spread over 3 masters."""
    broker = mosquitto_factory()
    url = f"redis://127.0.0.1:{redis_cluster[0]}/0"
    bridge = bridge_factory(broker.url, url, "--redis-cluster", "--shards", "8")
    bridge.start()
    devices = [f"dev-c{index}" for index in range(40)]
    orders = [(orders_topic(d), encode(make_order(d, seq))) for seq in range(10) for d in devices]
    publisher = Publisher(broker.url)
    # Any: redis-py types xrange's rows as optional and leaves get_node_from_key untyped.
    cluster: Any = RedisCluster(host="127.0.0.1", port=redis_cluster[0])
    try:
        for topic, payload in [*orders, *orders]:
            publisher.publish(topic, payload)
        publisher.publish(orders_topic(devices[0]), b"not msgpack at all")
        publisher.wait_all()

        def entries() -> list[tuple[str, str]]:
            return [
                (f[b"device_id"].decode(), f[b"order_id"].decode())
                for shard in range(8)
                for _, f in cluster.xrange(stream_key(shard))
            ]

        wait_until_blocking(lambda: len(entries()) >= len(orders), 60, "all orders on the cluster")
        wait_until_blocking(lambda: cluster.xlen(DLQ_STREAM) >= 1, 30, "the dead letter")
        stored = entries()
        assert len(stored) == len(set(stored)) == len(orders)
        # The shards really are spread over more than one master.
        nodes = {cluster.get_node_from_key(stream_key(shard)).name for shard in range(8)}
        assert len(nodes) > 1
        with redis.Redis(port=redis_cluster[1]) as node:
            assert node.execute_command("CLUSTER", "INFO").count(b"cluster_known_nodes:3") == 1
        assert bridge.terminate() == 0
    finally:
        publisher.close()
        cluster.close()


async def test_layout_set_moves_markers_across_the_masters(redis_cluster: list[int]) -> None:
    """The manifest's compare-and-set and `layout set` on a cluster: SCAN reaches every
    master, and markers and records move between slots with their TTLs."""
    client = AsyncRedisCluster(host="127.0.0.1", port=redis_cluster[0])
    try:
        agreed = await agree(client, service="t", where="cluster", shards=4, shards_given=True)
        assert agreed.shards == 4
        devices = [f"dev-k{index}" for index in range(40)]
        for device in devices:
            await client.set(seen_key(shard_of(device, 4), device, "o-1"), "d", ex=3600)
            await client.hset(order_key(device, "o-1", 4), mapping={"status": "fulfilled"})
        await set_shards(client, 8, settle_s=0)
        for device in devices:
            assert await client.get(seen_key(shard_of(device, 8), device, "o-1")) == b"d"
            assert await client.hget(order_key(device, "o-1", 8), "status") == b"fulfilled"
            if shard_of(device, 8) != shard_of(device, 4):
                assert await client.exists(seen_key(shard_of(device, 4), device, "o-1")) == 0
        assert Manifest.decode(await client.get(MANIFEST_KEY) or b"").shards == 8
    finally:
        await client.aclose()
