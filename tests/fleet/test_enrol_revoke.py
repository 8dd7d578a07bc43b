"""The ``enrol-revoke`` chaos kind: devices enrolled and revoked live during a fleet run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.chaos import check_feasible, parse_schedule
from fleet.errors import ChaosError
from fleet.sim import SimOptions, run
from fleet.stack import Stack, StackSettings
from testrig.errors import ServerError
from testrig.servers import find_dynsec_plugin
from tests.tools import unavailable

LIVE_S = 1.0  # the bound: a revoked session ends within a second


@pytest.fixture
def dynsec_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack whose broker runs the dynamic-security plugin with an admin account."""
    try:
        find_dynsec_plugin()
    except ServerError as exc:
        unavailable(str(exc))
    with Stack(tmp_path / "stack", StackSettings(dynsec=True)) as stack:
        yield stack


async def test_enrol_revoke_accounts_for_every_order(dynsec_stack: Stack) -> None:
    """4 devices enrolled live take orders; 2 are drained and revoked (sessions ended within
    1 s, refused at reconnect); the run ends 0 lost / duplicated / stuck / unheard, the
    revoked devices' orders among those checked."""
    pid = dynsec_stack.broker.pid
    options = SimOptions(devices=20, rate=20, duration_s=8, shards=4,
                         chaos="1:enrol-revoke=4", settle_timeout_s=60)  # fmt: skip
    result = await run(options, dynsec_stack)
    [report] = result.chaos.enrol_revoke
    v = result.verdict
    assert result.settled
    assert (v.lost, v.duplicated, v.stuck, v.unheard) == ([], {}, [], [])
    assert v.processed_twice == {}
    assert len(report.enrolled) == 4
    assert len(report.revoked) == 2
    assert report.drained
    assert report.ended_s is not None
    assert report.ended_s < LIVE_S
    assert report.refused == 2
    # Counted from the tracker's accepted orders: the very list the verifier checked.
    assert report.orders_of_revoked > 0
    assert dynsec_stack.broker.pid == pid  # no broker restart
    assert "enrol-revoke=4" in result.record.events[0][1]


def test_enrol_revoke_needs_a_dynsec_stack() -> None:
    """The kind parses with its default, and is refused without the plugin's stack."""
    [event] = parse_schedule("2:enrol-revoke")
    assert (event.kind, event.arg) == ("enrol-revoke", 4.0)
    with pytest.raises(ChaosError, match="needs a stack"):
        check_feasible([event], own_stack=False, proxy=False)
