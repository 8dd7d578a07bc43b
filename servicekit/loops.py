"""Background loops that never end silently.

Every service runs its long-lived loops as tasks of one :class:`asyncio.TaskGroup`,
each wrapped in :func:`critical`. A loop that can go on handles its own faults
(with :class:`servicekit.backoff.Backoff`) and never returns an error. One that
cannot go on raises; :func:`critical` logs a line naming the loop and raises
:class:`~servicekit.errors.LoopFailed`, the TaskGroup cancels the other loops,
and the entrypoint turns it into a non-zero exit (:func:`exit_code`), so that
systemd or compose restarts the process instead of it idling half alive.
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
