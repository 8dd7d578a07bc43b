"""WAIT vouches for the node that took the write: a pooled connection to another node."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
import redis
import redis.asyncio as aioredis

from bridge.errors import ReplicasShortfall
from bridge.store import RedisSink
from schemas.names import stream_key
from testrig.sentinel import replication
from testrig.servers import RedisProcess
from tests.bridge.test_store import valid


def _linked(replica: RedisProcess) -> None:
    deadline = time.monotonic() + 20
    while replication(replica.port).get("master_link_status") != "up":
        assert time.monotonic() < deadline, "replica never linked"
        time.sleep(0.05)


async def test_each_lane_waits_on_its_own_node(
    redis_factory: Callable[..., RedisProcess], redis_url: str
) -> None:
    """One lane's pooled connection reaches another node (a frozen master that was
    replaced and resumed, stand-in: a Redis without replicas): the batch is not
    confirmed, although the master the other lane and a fresh connection reach
    has its replica."""
    master = redis_factory()
    replica = redis_factory(extra_args=("--replicaof", "127.0.0.1", str(master.port)))
    _linked(replica)
    stale_port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    orders = [valid(f"dev-{n}", 1) for n in range(800)]
    first_shard = orders[0].shard
    # Lane 0 (the stale connection) takes one order; lane 1 (the master) a slower
    # 150, so lane 1 ends last and the connection it frees is the next one handed
    # out: before the fix, the fence's WAIT ran there and confirmed the batch.
    big_shard = next(o.shard for o in orders if o.shard != first_shard)
    big = [o for o in orders if o.shard == big_shard][:150]
    warm_up = next(o for o in orders if o.shard not in {first_shard, big_shard})
    batch = [orders[0], *big]
    assert len(big) == 150
    async with RedisSink(
        master.url, dedup_ttl_s=60, dlq_maxlen=100, min_replicas=1, replica_timeout_ms=200, lanes=2
    ) as sink:
        # Loads the script on the master. Its WAIT may miss the 200 ms on a busy machine (seen
        # beside two CPU hogs: 0 of 1); the script ran all the same, which is all this needs.
        with contextlib.suppress(ReplicasShortfall):
            await sink.write([warm_up], [], trim_shards=set())
        async with aioredis.Redis(port=stale_port) as stale_client:
            await sink.scripts.load(stale_client)
        # The connection a pool kept from before a failover: the first one handed out.
        client = sink._client
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        pool._available_connections.append(aioredis.Connection(host="127.0.0.1", port=stale_port))
        with pytest.raises(ReplicasShortfall):
            await sink.write(batch, [], trim_shards=set())
    with redis.Redis(port=stale_port) as stale, redis.Redis(port=master.port) as good:
        # The fault happened: one lane wrote to the node without replicas, the other to the master.
        assert (stale.xlen(stream_key(first_shard)), stale.xlen(stream_key(big_shard))) == (1, 0)
        assert (good.xlen(stream_key(first_shard)), good.xlen(stream_key(big_shard))) == (0, 150)
