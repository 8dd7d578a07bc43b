"""A master left without its replica refuses writes (``min-replicas-to-write 1``): the
services hold and retry, and once the replica is back nothing is lost or doubled.

fleet-sim's Sentinel stack runs its nodes on ``min-replicas-to-write 1``, so a master
whose replicas all left (for a promoted one) answers NOREPLICAS instead of taking writes
its demotion would discard. Here a real master with one replica and three Sentinels on
that setting, a real ``order-bridge`` (``--redis-min-replicas 1``, as in the stack) and
``order-pipeline run``, both given only the Sentinels. Under load the replica is
SIGKILLed: the master counts no replica, refuses a probe write with NOREPLICAS, its
streams stop growing, nothing published meanwhile is receipted, and both services log
the refusal (the pipeline's idle read, XREADGROUP, is a write too). The replica is
started again: every published order ends in the streams once, receipted ``accepted``
and processed to a terminal status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import redis

from bridge.store import store_error
from schemas.names import PIPELINE_GROUP, stream_key
from servicekit.redis_clients import error_code
from testrig.sentinel import SentinelGroup, replication
from testrig.servers import MosquittoProcess, port_is_open
from tests.bridge.conftest import BridgeProcess, ReceiptCollector
from tests.bridge.failover_rig import (
    SHARDS,
    Load,
    accepted,
    processed,
    stream_order_ids,
    worked_since,
)
from tests.bridge.test_sentinel_failover import start_services
from tests.helpers import wait_until_blocking
from tests.tools import require_tool

OUTAGE_S = 2.0  # how long the master stays without its replica, refusing


def stream_length(client: redis.Redis) -> int:
    """Entries in all shard streams of the node."""
    return sum(int(client.xlen(stream_key(shard))) for shard in range(SHARDS))


def refusal(client: redis.Redis) -> str:
    """What the node answers to a plain write: its error, or "" if it took it."""
    try:
        client.set("noreplicas:probe", "1")
    except redis.ResponseError as exc:
        return str(exc)
    return ""


def read_refusal(client: redis.Redis) -> str:
    """What the node answers to the workers' read (XREADGROUP, a write: it moves the PEL)."""
    try:
        client.xreadgroup(PIPELINE_GROUP, "noreplicas-probe", {stream_key(0): ">"}, count=1)
    except redis.ResponseError as exc:
        return str(exc)
    return ""


def test_the_bridge_names_the_code_redis_refused_with() -> None:
    """redis-py's repr names only the class; the StoreError adds Redis's code, also from
    inside a pipeline's error (whose command text comes first and may hold anything)."""
    inner = "NOREPLICAS Not enough good replicas to write."
    command = "EVALSHA x of pipeline caused error: ('OOM')"
    piped = f"Command # 1 ({command}) of pipeline caused error: ('{inner}',)"
    assert error_code(redis.ResponseError(inner)) == "NOREPLICAS"
    assert error_code(redis.ResponseError(piped)) == "NOREPLICAS"
    assert error_code(redis.ConnectionError("Connection closed by server.")) is None
    assert str(store_error(redis.ResponseError(piped), "redis batch")).endswith(" NOREPLICAS")


def test_a_master_without_its_replica_refuses_and_the_services_retry(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: Callable[..., BridgeProcess],
) -> None:
    require_tool("redis-server")
    broker = mosquitto_factory()
    receipts = ReceiptCollector(broker.url)
    load = Load(broker.url, devices=10, rate=50.0)
    group = SentinelGroup(
        tmp_path / "sentinel", replicas=1, min_replicas_to_write=1,
        # No failover is wanted here: a master busy with the resync must not look down.
        down_after_ms=5000,
        extra_args=("--repl-diskless-sync-delay", "0"),  # the replica syncs at once (twice)
    )  # fmt: skip
    with group:
        master = redis.Redis(port=group.master.port, socket_timeout=5)
        replica = group.replicas[0]
        bridge, pipeline = start_services(tmp_path, group, broker, bridge_factory, 1)
        try:
            load.start()
            wait_until_blocking(lambda: len(accepted(receipts)) >= 50, 30, "receipts before")
            wait_until_blocking(lambda: worked_since(master, 0), 60, "the pipeline at work")

            replica.kill()
            assert not replica.running
            assert not port_is_open(replica.port), "replica still up"
            wait_until_blocking(
                lambda: replication(group.master.port).get("connected_slaves") == 0,
                10,
                "the master counts no replica",
            )
            assert refusal(master).startswith("NOREPLICAS"), refusal(master)
            assert read_refusal(master).startswith("NOREPLICAS"), read_refusal(master)
            refused_at = time.monotonic()
            before = stream_length(master)
            time.sleep(OUTAGE_S)
            assert stream_length(master) == before, "the master took writes without a replica"
            assert not set(load.after(refused_at)) & accepted(receipts), "receipted meanwhile"
            wait_until_blocking(
                lambda: "NOREPLICAS" in bridge.log_path.read_text(errors="replace"),
                10,
                "the bridge's write refused",
            )
            pipeline_log = tmp_path / "pipeline.log"
            # Its log names only the class (redis-py's repr): the probe above shows the code.
            wait_until_blocking(
                lambda: '"msg": "redis_error"' in pipeline_log.read_text(errors="replace"),
                10,
                "the pipeline's worker refused",
            )

            replica.start()
            wait_until_blocking(
                lambda: replication(replica.port).get("master_link_status") == "up",
                30,
                "the replica back in sync",
            )
            # The master counts it once its first acknowledgement arrives, after the link.
            wait_until_blocking(
                lambda: replication(group.master.port).get("min_slaves_good_slaves") == 1,
                30,
                "the master counts the replica again",
            )
            assert refusal(master) == ""
            wait_until_blocking(
                lambda: bool(set(load.after(refused_at)) & accepted(receipts)),
                30,
                "receipts again",
            )
            load.stop()
            published = set(load.published)
            assert len(load.after(refused_at)) >= OUTAGE_S * load.rate * 0.5, "too little load"
            wait_until_blocking(
                lambda: accepted(receipts) == published,
                60,
                "every published order receipted",
                explain=lambda: f"not receipted: {len(published - accepted(receipts))}",
            )
            wait_until_blocking(
                lambda: processed(master, published) == published,
                60,
                "every order processed",
                explain=lambda: f"not done: {len(published - processed(master, published))}",
            )
            in_streams = stream_order_ids(master)
            assert set(in_streams) == published
            twice = {oid: n for oid, n in in_streams.items() if n > 1}
            assert not twice, f"orders twice in the streams: {twice}"
            assert group.master_port() == group.master.port, "a failover the test did not make"
            assert pipeline.alive()
            assert bridge.status("/healthz") == 200
            # Held and retried, not crashed and restarted.
            logs = pipeline_log.read_text(errors="replace") + bridge.log_path.read_text()
            for death in ("background_loop_failed", "worker_process_died"):
                assert death not in logs
        finally:
            load.close()
            receipts.close()
            pipeline.stop()
            master.close()
