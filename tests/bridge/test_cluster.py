"""The same bridge against a real 3-master Redis Cluster (redis-py's cluster client)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster

from schemas import encode
from schemas.names import DLQ_STREAM, orders_topic, stream_key
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
