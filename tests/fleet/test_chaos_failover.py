"""fleet-sim on a stack with Redis replicas: ``redis-failover`` and ``redis-freeze`` in one run.

The stack (``StackSettings(redis_replicas=2)``, ``fleet-sim stack --redis-replicas 2``)
runs a master, two replicas and three Sentinels; its bridges and pipeline find the
master through them and wait for one replica per batch. The run SIGKILLs the master
(a replica promoted, the old node back), then freezes the new one past the failover.
Each fault proves it happened in its event line; the verifier, which follows the
master through the Sentinels too, finds 0 lost, 0 duplicated, 0 stuck.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import redis

from fleet.chaos import ChaosEvent, ChaosRunner, parse_schedule
from fleet.errors import ChaosError
from fleet.sim import SimOptions, run
from fleet.stack import Stack, StackSettings
from testrig.sentinel import replication, role
from tests.tools import require_tool

DEVICES = 30
RATE = 30.0
DURATION_S = 16.0


def test_parse_the_failover_kinds_and_refuse_them_without_replicas(tmp_path: Path) -> None:
    """The kinds parse (redis-freeze defaults to 5 s); a stack without replicas refuses them."""
    assert parse_schedule("3:redis-failover,9:redis-freeze=4,12:redis-freeze") == [
        ChaosEvent(3, "redis-failover"),
        ChaosEvent(9, "redis-freeze", 4.0),
        ChaosEvent(12, "redis-freeze", 5.0),
    ]
    plain = Stack(tmp_path / "plain", StackSettings())  # not started: only its settings count
    for kind in ("redis-failover", "redis-freeze=2"):
        with pytest.raises(ChaosError, match="need a stack with Redis replicas"):
            ChaosRunner(
                parse_schedule(f"1:{kind}"), stack=plain, proxy=None, fleet=None,  # type: ignore[arg-type]
                mqtt_url="mqtt://127.0.0.1:1", prefix="t",
            )  # fmt: skip


def min_replicas_to_write(command: list[str]) -> str | None:
    """The ``--min-replicas-to-write`` a redis-server command line sets, if any."""
    flag = "--min-replicas-to-write"
    return command[command.index(flag) + 1] if flag in command else None


def test_sentinel_nodes_refuse_writes_without_a_replica_cluster_nodes_do_not(
    tmp_path: Path,
) -> None:
    """Every node of the Sentinel stack runs min-replicas-to-write 1 (a master its replicas
    left refuses what its demotion would discard); the Cluster's (one replica per master,
    where it would stop a failed-over shard's every write until the old node is back) not."""
    require_tool("redis-server")
    sentinel = Stack(tmp_path / "sentinel", StackSettings(redis_replicas=2))  # not started
    cluster = Stack(tmp_path / "cluster", StackSettings(redis_cluster=True, redis_replicas=1))
    assert sentinel.ha is not None
    assert cluster.cluster is not None
    assert [min_replicas_to_write(node.command()) for node in sentinel.ha.nodes] == ["1"] * 3
    assert {min_replicas_to_write(node.command()) for node in cluster.cluster.servers} == {None}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HA_SLOW"), reason="set HA_SLOW=1 (about 70 s)")
async def test_failover_and_freeze_cost_no_order(tmp_path: Path) -> None:
    require_tool("redis-server")
    settings = StackSettings(shards=4, redis_replicas=2)
    with Stack(tmp_path / "stack", settings) as stack:
        first = stack.master().port
        with redis.Redis(port=first) as master:
            assert master.config_get("min-replicas-to-write") == {"min-replicas-to-write": "1"}
        options = SimOptions(
            devices=DEVICES, rate=RATE, duration_s=DURATION_S, shards=4,
            chaos="3:redis-failover,9:redis-freeze=4",
            settle_timeout_s=90, receipt_timeout_s=3.0, status_wait_s=20,
        )  # fmt: skip
        result = await run(options, stack)
        events = [detail for _at, detail in result.record.events]
        now = stack.master().port
        assert role(now) == "master"
    v = result.verdict
    assert v.checked > RATE * DURATION_S * 0.5, "too few orders to prove anything"
    assert result.settled, "the run did not reach quiescence"
    assert (v.lost, v.duplicated, v.stuck) == ([], {}, [])
    assert len(events) == 2
    failover, freeze = events
    shape = (rf"redis-failover \(master :{first} pid \d+ gone, :\d+ promoted in [0-9.]+ s "
             r"\(ROLE master\), old node back\)")  # fmt: skip
    assert re.fullmatch(shape, failover), failover
    assert re.search(r" pid \d+ stopped 4 s, :", freeze), freeze  # not "NOT stopped"
    assert " promoted; resumed" in freeze, freeze
    assert now != first


CLUSTER_DEVICES = 20
CLUSTER_RATE = 20.0


def cluster_schedule() -> tuple[str, float]:
    """The chaos and the duration: a failover (default), a failover and a freeze (HA_SLOW=1)."""
    if os.environ.get("HA_SLOW"):
        return "3:redis-failover,14:redis-freeze=6", 24.0
    return "3:redis-failover", 8.0


async def test_cluster_failover_costs_no_order(tmp_path: Path) -> None:
    """``fleet-sim stack --redis-cluster --redis-replicas 1``: the master of shard 0's slot
    is SIGKILLed (its replica promoted, ROLE says so; the old node restarted rejoins as a
    replica); with HA_SLOW=1 the new master is then frozen past cluster-node-timeout and
    resumed. The verifier, on a Cluster client, finds 0 lost, 0 duplicated, 0 stuck."""
    require_tool("redis-cli")
    chaos, duration_s = cluster_schedule()
    settings = StackSettings(shards=4, redis_cluster=True, redis_replicas=1)
    with Stack(tmp_path / "stack", settings) as stack:
        assert stack.cluster is not None
        first = stack.master()
        options = SimOptions(
            devices=CLUSTER_DEVICES, rate=CLUSTER_RATE, duration_s=duration_s, shards=4,
            chaos=chaos, settle_timeout_s=90, receipt_timeout_s=3.0, status_wait_s=20,
        )  # fmt: skip
        result = await run(options, stack)
        events = [detail for _at, detail in result.record.events]
        print("\n" + "\n".join(events))
        # Each event names the master it hit and the one promoted in its place.
        hits = [re.search(r"master :(\d+) .*:(\d+) promoted", e) for e in events]
        assert all(hits), events
        hit, heir = (int(port) for port in hits[-1].groups())  # type: ignore[union-attr]
        assert hits[0][1] == str(first.port)  # type: ignore[index]
        assert stack.master_port() == heir
        assert role(heir) == "master"
        # The last master hit came back (restarted, or resumed) as its heir's replica.
        back = replication(hit)
        assert (back.get("role"), back.get("master_port")) == ("slave", heir), back
    v = result.verdict
    print(f"cluster chaos: {v.checked} orders, {len(v.lost)} lost, {len(v.duplicated)} "
          f"duplicated, {len(v.stuck)} stuck")  # fmt: skip
    assert v.checked > CLUSTER_RATE * duration_s * 0.5, "too few orders to prove anything"
    assert result.settled, "the run did not reach quiescence"
    assert (v.lost, v.duplicated, v.stuck, v.unheard) == ([], {}, [], [])
    failover = events[0]
    shape = (rf"redis-failover \(master :{first.port} pid \d+ gone, :\d+ promoted in [0-9.]+ s "
             r"\(ROLE master\), old node back\)")  # fmt: skip
    assert re.fullmatch(shape, failover), failover
    if len(events) > 1:
        freeze = events[1]
        assert re.search(r" pid \d+ stopped 6 s, :\d+ promoted; resumed, the Cluster", freeze), (
            freeze
        )
