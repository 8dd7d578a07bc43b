"""servicekit.loops: a loop that cannot go on is named in the log and ends its TaskGroup."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from servicekit.errors import LoopFailed
from servicekit.loops import critical, failed_loops


async def test_a_failed_loop_is_named_and_cancels_the_others() -> None:
    """One loop raises: LoopFailed names it, the log line too, the other loop is cancelled."""
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def broken() -> None:
        await asyncio.sleep(0.01)
        raise KeyError("bug")

    async def both() -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(critical("forever", forever()))
            tasks.create_task(critical("broken", broken()))

    with structlog.testing.capture_logs() as logs, pytest.raises(BaseExceptionGroup) as caught:
        await both()
    (failure,) = failed_loops(caught.value)
    assert isinstance(failure, LoopFailed)
    assert failure.loop == "broken"
    assert cancelled.is_set()
    assert any(e["event"] == "background_loop_failed" and e["loop"] == "broken" for e in logs)


async def test_cancellation_is_not_a_failure() -> None:
    """A loop cancelled on shutdown raises CancelledError, not LoopFailed."""
    task = asyncio.create_task(critical("idle", asyncio.sleep(3600)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert failed_loops(ValueError()) == []
