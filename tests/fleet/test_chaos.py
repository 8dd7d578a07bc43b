"""The chaos schedule parser and the feasibility rules for stacks we did not start."""

from __future__ import annotations

import pytest

from fleet.chaos import ChaosEvent, check_feasible, parse_schedule
from fleet.errors import ChaosError


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
