"""redis-py's command send, with a cancel that is never lost on CPython 3.11.

redis-py 8 sends each command under ``asyncio.wait_for(send, socket_timeout)``.
On CPython 3.11, ``wait_for`` returns the send's result when a cancel reaches
the awaiting task in the loop turn the send finished in, and the cancel is gone
(python/cpython#86296, fixed in 3.12 by rebuilding ``wait_for`` on
``asyncio.timeout``). A loop cancelled at that moment carried on: a pipeline
worker whose layout watch had failed kept reading its streams for ever, and its
shutdown never ended (tests/bridge/test_layout.py under CPU load, 4 runs of 6).

:func:`install` puts the same send, under ``asyncio.timeout``, on every redis-py
async connection class; :mod:`servicekit.redis_clients` installs it on import.
``tests/servicekit/test_redis_send.py`` shows the cancel lost without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Final

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

STOCK_SEND: Final = AbstractConnection.send_packed_command


async def send_packed_command(
    self: AbstractConnection,
    command: bytes | str | Iterable[bytes],
    check_health: bool = True,
) -> None:
    """redis-py 8.1's ``AbstractConnection.send_packed_command`` with ``asyncio.timeout``."""
    if not self.is_connected:
        await self.connect_check_health(check_health=False)
    if check_health:
        await self.check_health()  # type: ignore[no-untyped-call]
    if isinstance(command, str):
        command = command.encode()
    if isinstance(command, bytes):
        command = [command]
    writer = self._writer
    assert writer is not None  # connected above
    try:
        async with asyncio.timeout(self.socket_timeout or None):
            writer.writelines(command)
            await writer.drain()
    except TimeoutError:
        await self.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await self.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc!r}") from exc
    except BaseException:
        # As redis-py: a send cut short leaves the connection unusable.
        await self.disconnect(nowait=True)
        raise


def install() -> None:
    """Replace redis-py's send on every async connection class (they all inherit it)."""
    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
