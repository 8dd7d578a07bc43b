"""The chaos schedule parser and the feasibility rules for stacks we did not start."""

from __future__ import annotations

import time

import pytest

from fleet.chaos import (
    KINDS,
    ChaosEvent,
    Kind,
    StormReport,
    _buckets,
    check_feasible,
    parse_schedule,
    register_kind,
)
from fleet.clockskew import WallClockSkew
from fleet.errors import ChaosError
from servicekit.clock import now_ms


def test_parse_full_schedule_sorted_with_defaults() -> None:
    """Every kind parses; arguments default where the kind takes one; events come sorted."""
    events = parse_schedule(
        "58:rogue=50,20:broker-restart,30:bridge-kill,40:redis-stop,45:worker-kill,"
        "50:drop=0.3,52:refuse=2,55:dup-flood"
    )
    assert [e.kind for e in events] == [
        "broker-restart", "bridge-kill", "redis-stop", "worker-kill", "drop", "refuse",
        "dup-flood", "rogue",
    ]  # fmt: skip
    assert events[2] == ChaosEvent(40.0, "redis-stop", 5.0)
    assert events[-1].label == "rogue=50"
    assert events[0].label == "broker-restart"


@pytest.mark.parametrize("text", ["20:nuke", "x:drop", "20", "20:drop=lots", "-1:drop"])
def test_parse_refuses_bad_entries(text: str) -> None:
    """Unknown kinds, bad times and bad arguments are a ChaosError naming the entry."""
    with pytest.raises(ChaosError, match="bad chaos entry"):
        parse_schedule(text)


def test_empty_schedule() -> None:
    """No chaos is an empty schedule."""
    assert parse_schedule("") == []


def test_process_faults_need_our_own_stack() -> None:
    """Against a stack we did not start, only network faults and device behaviour are offered."""
    with pytest.raises(ChaosError, match="started itself"):
        check_feasible(parse_schedule("1:worker-kill"), own_stack=False, proxy=True)
    with pytest.raises(ChaosError, match="proxy"):
        check_feasible(parse_schedule("1:drop=0.5"), own_stack=True, proxy=False)
    check_feasible(parse_schedule("1:dup-flood,2:rogue=3,3:drop"), own_stack=False, proxy=True)


def test_parse_the_durability_kinds() -> None:
    """redis-powercut, agent-powercut, redis-oom=S and clock-skew=±S parse; only skew goes back."""
    events = parse_schedule("1:redis-powercut,2:agent-powercut,3:redis-oom,4:clock-skew=-259200")
    assert events == [
        ChaosEvent(1.0, "redis-powercut"),
        ChaosEvent(2.0, "agent-powercut"),
        ChaosEvent(3.0, "redis-oom", 3.0),
        ChaosEvent(4.0, "clock-skew", -259_200.0),
    ]
    assert parse_schedule("5:clock-skew")[0].arg == 3 * 86_400
    assert events[3].label == "clock-skew=-259200"
    with pytest.raises(ChaosError, match="bad chaos entry"):
        parse_schedule("1:redis-oom=-3")
    with pytest.raises(ChaosError, match="started itself"):
        check_feasible(parse_schedule("1:redis-powercut"), own_stack=False, proxy=False)
    check_feasible(parse_schedule("1:agent-powercut,2:clock-skew"), own_stack=False, proxy=False)


def test_wall_clock_skew_moves_now_ms_and_restores_it() -> None:
    """The devices' now_ms jumps by the skew (both ways) and comes back; monotonic time does not."""
    skew = WallClockSkew()
    try:
        skew.jump(3 * 86_400)
        assert abs(now_ms() - time.time_ns() // 1_000_000 - 3 * 86_400_000) < 1_000
        skew.jump(-6 * 86_400)
        assert abs(now_ms() - time.time_ns() // 1_000_000 + 3 * 86_400_000) < 1_000
    finally:
        skew.restore()
    assert abs(now_ms() - time.time_ns() // 1_000_000) < 1_000


def test_parse_spike_and_storm() -> None:
    """spike takes MULTIPLIERx:SECONDSs (default 10x:30s); storm takes nothing."""
    spike, default, storm = parse_schedule("5:spike=2.5x:4s,9:spike,20:storm")
    assert spike == ChaosEvent(5.0, "spike", 2.5, 4.0)
    assert spike.label == "spike=2.5x:4s"
    assert (default.arg, default.arg2) == (10.0, 30.0)
    assert storm == ChaosEvent(20.0, "storm")
    assert storm.label == "storm"


@pytest.mark.parametrize(
    "text",
    ["1:spike=10", "1:spike=10x", "1:spike=x:30s", "1:spike=0x:30s", "1:spike=10x:0s",
     "1:spike=10x:30sec", "1:spike=10x:30", "1:storm=3", "1:broker-restart=1", "1:drop=inf"],
)  # fmt: skip
def test_parse_refuses_bad_spike_and_storm_arguments(text: str) -> None:
    """A spike's argument matches the whole pattern; kinds without one refuse one."""
    with pytest.raises(ChaosError, match="bad chaos entry"):
        parse_schedule(text)


def test_storm_needs_our_stack_and_device_kinds_need_one_process() -> None:
    """storm restarts our broker; agent-powercut and clock-skew refuse worker processes."""
    with pytest.raises(ChaosError, match="started itself"):
        check_feasible(parse_schedule("1:storm"), own_stack=False, proxy=False)
    for kind in ("agent-powercut", "clock-skew"):
        with pytest.raises(ChaosError, match="--processes 1"):
            check_feasible(parse_schedule(f"1:{kind}"), own_stack=True, proxy=False, processes=2)
    check_feasible(parse_schedule("1:spike,2:storm,3:dup-flood"), own_stack=True, proxy=False,
                   processes=4)  # fmt: skip


def test_kinds_are_one_table_and_a_name_registers_once() -> None:
    """A new kind registers with its injector; a taken name is refused."""

    async def noop(runner: object, event: ChaosEvent, n: int) -> str:
        return ""

    try:
        register_kind("test-noop", Kind(noop, default="1"))
        assert parse_schedule("1:test-noop=2")[0] == ChaosEvent(1.0, "test-noop", 2.0)
        with pytest.raises(ChaosError, match="already registered"):
            register_kind("test-noop", Kind(noop))
    finally:
        KINDS.pop("test-noop", None)


def test_storm_attempt_histogram() -> None:
    """Attempts fall into 100 ms buckets from the kill; the 1 s window slides over them."""
    counts = _buckets([10.0, 10.05, 10.12, 10.95, 11.25, 12.35], 10.0, 0.1)
    assert counts == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    report = StormReport(0.0, 6, 6, attempts_per_bucket=counts)
    assert report.attempts == 6
    assert report.max_per_bucket == 2
    assert report.max_per_s == 4  # 10.0–10.95
    assert report.attempts_per_s == [4, 1, 1]
