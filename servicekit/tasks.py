"""Background loops that cannot die silently.

A service's long-running loops (an MQTT supervisor, a responder) either go on
for ever, retrying what can be retried, or stop the service. A loop that ends
with an unexpected exception is logged at CRITICAL with its name, and the task
that owns the loops (the one in whose ``async with`` they run) is cancelled;
:meth:`Loops.close` then raises :class:`LoopDied`, so the error reaches the
entry point and the process exits non-zero instead of carrying on half-dead.
Nothing here is awaited with ``gather(return_exceptions=True)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

from .errors import ServiceKitError

log = structlog.get_logger(__name__)


class LoopDied(ServiceKitError):
    """A background loop ended with an unexpected error (the cause is chained)."""

    def __init__(self, loop: str, error: BaseException) -> None:
        super().__init__("loop_died", f"{loop}: {error!r}")
        self.loop = loop


class Loops:
    """Named background tasks owned by the task that created this object."""

    def __init__(self) -> None:
        self._owner = asyncio.current_task()
        self._tasks: list[asyncio.Task[None]] = []
        self.failure: LoopDied | None = None

    def start(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task named ``name``; its death takes the owner down."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_done)
        self._tasks.append(task)
        return task

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        name = task.get_name()
        log.critical("background loop died", loop=name, error=repr(error), exc_info=error)
        if self.failure is None:
            self.failure = LoopDied(name, error)
            self.failure.__cause__ = error
            if self._owner is not None and not self._owner.done():
                self._owner.cancel(f"loop {name} died")

    async def close(self) -> None:
        """Cancel and await every loop; raise :class:`LoopDied` if one had died."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # wait(), not gather(): it never raises a task's error (those were
            # reported by _on_done) and never swallows our own cancellation.
            await asyncio.wait(self._tasks)
        if self.failure is not None:
            owner = asyncio.current_task()
            if owner is not None and owner is self._owner:
                owner.uncancel()  # the cancellation was ours: it becomes LoopDied
            raise self.failure
