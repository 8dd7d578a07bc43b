"""The event loop of a simulator process: uvloop when all its devices are light.

A light device's order costs about three socket reads (the order's PUBACK, its
receipt, its statuses), each mostly a loop wakeup of its own, and one or two
writes; in asyncio's selector loop that wakeup, read and write run in Python.
uvloop (the cloud extras, as the bridge and the pipeline use it) runs them in C:
2-4 µs less per read at 1-4 sockets per wakeup (``/tmp`` micro-benchmark over
loopback TCP). Real agents keep asyncio's loop, which their tests run on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


def runner(*, light_only: bool) -> Callable[[Coroutine[Any, Any, _T]], _T]:
    """uvloop's ``run`` for a process of light devices only, where installed; else asyncio's."""
    if not light_only:
        return asyncio.run
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up (the bridge extra), absent on Windows
    except ImportError:
        return asyncio.run
    return uvloop.run
