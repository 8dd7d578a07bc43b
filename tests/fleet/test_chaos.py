"""The chaos schedule parser and the feasibility rules for stacks we did not start."""

from __future__ import annotations

import time

import pytest

from fleet.chaos import ChaosEvent, check_feasible, parse_schedule
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
