"""Background loops that never end silently.

Every service runs its long-lived loops as tasks of one :class:`asyncio.TaskGroup`,
each wrapped in :func:`critical`; an async context manager that owns loops for
the length of its ``async with`` (the MQTT client) uses :class:`Loops`. A loop
that can go on handles its own faults (with :class:`servicekit.backoff.Backoff`)
and never returns an error. One that cannot go on raises; :func:`critical` logs
a line naming the loop and raises :class:`~servicekit.errors.LoopFailed`, the
TaskGroup cancels the other loops, and the entrypoint turns it into a non-zero
exit (:func:`failed_loops` finds it), so that systemd or compose restarts the
process instead of it idling half alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

from .errors import LoopFailed

log = structlog.get_logger(__name__)


async def critical(name: str, loop: Coroutine[Any, Any, None]) -> None:
    """Await ``loop``; if it raises, log ``background_loop_failed`` naming it, raise LoopFailed."""
    try:
        await loop
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.critical("background_loop_failed", loop=name, error=repr(exc), exc_info=True)
        raise LoopFailed(name, repr(exc)) from exc


def failed_loops(exc: BaseException) -> list[LoopFailed]:
    """The LoopFailed errors inside ``exc`` (itself or nested exception groups)."""
    if isinstance(exc, LoopFailed):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [inner for sub in exc.exceptions for inner in failed_loops(sub)]
    return []


class Loops:
    """Named background tasks owned by the task that entered an ``async with``.

    The TaskGroup semantics for a context manager whose ``__aenter__`` and
    ``__aexit__`` bracket the caller's code: a loop that fails is logged (by
    :func:`critical`), the owner task is cancelled, and :meth:`close` raises
    the :class:`LoopFailed`.
    """

    def __init__(self) -> None:
        self._owner = asyncio.current_task()
        self._tasks: list[asyncio.Task[None]] = []
        self.failure: LoopFailed | None = None

    def start(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task named ``name``; its failure takes the owner down."""
        task = asyncio.create_task(critical(name, coro), name=name)
        task.add_done_callback(self._on_done)
        self._tasks.append(task)
        return task

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, LoopFailed) and self.failure is None:
            self.failure = error
            if self._owner is not None and not self._owner.done():
                self._owner.cancel(f"loop {error.loop} failed")

    async def close(self) -> None:
        """Cancel and await every loop; raise :class:`LoopFailed` if one had failed."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # wait(), not gather(): it never raises a task's error (critical logged
            # it) and never swallows our own cancellation.
            await asyncio.wait(self._tasks)
        if self.failure is not None:
            owner = asyncio.current_task()
            if owner is not None and owner is self._owner:
                owner.uncancel()  # the cancellation was ours: it becomes LoopFailed
            raise self.failure
