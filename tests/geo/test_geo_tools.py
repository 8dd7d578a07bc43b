"""The geo chaos schedule and the geo verifier, against real Redis servers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from fleet.chaos import ChaosEvent, check_feasible, parse_schedule
from fleet.errors import ChaosError
from fleet.geo.verify import OutboxRow, verify_geo
from schemas.names import stream_key
from testrig.servers import RedisProcess


def test_geo_kinds_parse_with_region_names_and_durations() -> None:
    """region-down=NAME/S, region-partition=A|B/S and failover-storm parse; defaults apply."""
    events = parse_schedule("5:region-down=eu/3,8:region-partition=eu|us,9:failover-storm")
    assert events == [
        ChaosEvent(5.0, "region-down", 3.0, target="eu"),
        ChaosEvent(8.0, "region-partition", 10.0, target="eu|us"),
        ChaosEvent(9.0, "failover-storm", 10.0, target=""),
    ]
    assert events[1].label == "region-partition=eu|us/10s"


@pytest.mark.parametrize(
    "bad",
    ["1:region-down=eu|us", "1:region-partition=eu", "1:region-down=eu/x", "1:failover-storm=EU",
     "-1:region-down=eu", "1:region-down=eu/0"],
)  # fmt: skip
def test_malformed_geo_entries_are_refused(bad: str) -> None:
    """Each malformed geo entry is a ChaosError naming the entry, never a crash."""
    with pytest.raises(ChaosError):
        parse_schedule(bad)


def test_geo_kinds_need_a_geo_rig() -> None:
    """A single-region run refuses the geo kinds before it starts."""
    with pytest.raises(ChaosError, match="--regions"):
        check_feasible(parse_schedule("1:region-down=eu"), own_stack=True, proxy=True)


async def test_verifier_merges_regions_and_names_each_failure(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    """Counts across regions: duplicated, lost, in doubt, misplaced each found; the rest fine."""
    servers = {"eu": redis_factory(), "us": redis_factory()}
    clients = {name: aioredis.from_url(s.url) for name, s in servers.items()}
    try:
        entries = {
            "eu": [("d", "fine-eu"), ("d", "twice"), ("d", "misplaced")],
            "us": [("d", "fine-us"), ("d", "twice"), ("d", "no-attempts")],
        }
        for name, refs in entries.items():
            for device_id, order_id in refs:
                await clients[name].xadd(
                    stream_key(0), {"device_id": device_id, "order_id": order_id}
                )
        rows = {
            ("d", "fine-eu"): OutboxRow(("eu",), True),
            ("d", "fine-us"): OutboxRow(("us", "eu"), True),
            ("d", "twice"): OutboxRow(("eu", "us"), True),
            ("d", "misplaced"): OutboxRow(("us",), True),
            ("d", "waiting"): OutboxRow(("eu",), False),
            ("d", "gone"): OutboxRow(("eu",), True),
        }
        accepted = [*rows, ("d", "no-attempts")]
        verdict = await verify_geo(clients, accepted, rows, shards=1, pipeline_writes=False)
    finally:
        for client in clients.values():
            await client.aclose()
    assert verdict.duplicated == {("d", "twice"): 2}
    assert verdict.lost == [("d", "gone")]
    assert verdict.in_doubt == {("d", "waiting"): "eu"}
    assert verdict.misplaced == {
        ("d", "misplaced"): "in eu, authority us",
        ("d", "twice"): "in us, authority eu",
    }
    assert verdict.per_region == {"eu": 3, "us": 3}
    assert not verdict.ok
    assert verdict.max_count_seen == 2
